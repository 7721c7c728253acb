//! The DynamoDB adapter's [`TenantStore`]: tenants' settings and identity.

use super::*;

#[async_trait]
impl TenantStore for DynamoStore {
    async fn tenant_settings(&self, tenant: &str) -> Result<Option<TenantSettings>> {
        self.get_typed("get_item (tenant settings)", key(model::tenant_pk(tenant), model::SETTINGS_SK.into())).await
    }

    async fn tenant_identity(&self, tenant: &str) -> Result<Option<crate::model::TenantIdentity>> {
        let key = key(model::tenant_pk(tenant), crate::model::IDENTITY_SK.into());
        match self.get_guarded("get_item (tenant identity)", key).await? {
            // One that does not decode must not read as "none" (the shared secret would admit).
            (None, true) => Err(StoreError::Unavailable(format!("{tenant}'s identity item does not decode"))),
            (identity, _) => Ok(identity),
        }
    }

    async fn put_tenant_identity(&self, identity: &crate::model::TenantIdentity) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(identity)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (tenant identity)", e))?;
        Ok(())
    }

    async fn put_tenant_settings(&self, settings: &TenantSettings) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(settings)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (tenant settings)", e))?;
        Ok(())
    }
}
