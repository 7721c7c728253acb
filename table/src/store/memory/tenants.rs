//! The embedded adapter's [`TenantStore`]: tenants' settings and identity.

use super::*;

#[async_trait]
impl TenantStore for MemoryStore {
    async fn tenant_settings(&self, tenant: &str) -> Result<Option<TenantSettings>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::tenant_pk(tenant), model::SETTINGS_SK.to_string())))
    }

    async fn tenant_identity(&self, tenant: &str) -> Result<Option<crate::model::TenantIdentity>> {
        let table = self.lock();
        let key = (model::tenant_pk(tenant), crate::model::IDENTITY_SK.to_string());
        let identity = self.get(&table, &key);
        if identity.is_none() && table.items.contains_key(&key) {
            // One that does not decode must not read as "none" (the shared secret would admit).
            return Err(StoreError::Unavailable(format!("{tenant}'s identity item does not decode")));
        }
        Ok(identity)
    }

    async fn put_tenant_identity(&self, identity: &crate::model::TenantIdentity) -> Result<()> {
        let item = encode(identity)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }

    async fn put_tenant_settings(&self, settings: &TenantSettings) -> Result<()> {
        let item = encode(settings)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }
}
