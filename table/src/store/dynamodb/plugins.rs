//! The DynamoDB adapter's [`PluginStore`]: plugin versions, their bytes, the active one, configuration.

use super::*;

#[async_trait]
impl PluginStore for DynamoStore {
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> Result<()> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.into())))
            .update_expression("SET authorizesJoins = :a")
            .condition_expression("version = :v")
            .expression_attribute_values(":a", AttributeValue::Bool(authorizes))
            .expression_attribute_values(":v", s(version))
            .send()
            .await;
        written("update_item (active plugin joins)", result).map(|_| ())
    }

    async fn put_plugin(&self, meta: &PluginMeta, chunks: &[PluginChunk]) -> Result<()> {
        for chunk in chunks {
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(encode(chunk)?))
                .send()
                .await
                .map_err(|e| unavailable("put_item (plugin chunk)", e))?;
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(meta)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (plugin)", e))?;
        Ok(())
    }

    async fn plugin_bytes(&self, tenant: &str, version: &str, chunks: usize) -> Result<Option<Vec<u8>>> {
        let mut bytes = Vec::new();
        // Versions uploaded before chunks had their own prefix keep them under the old key.
        let mut sk: fn(&str, usize) -> String = model::plugin_chunk_sk;
        for index in 0..chunks {
            let mut chunk = self.get_chunk(tenant, &sk(version, index)).await?;
            if chunk.is_none() && index == 0 {
                sk = model::legacy_plugin_chunk_sk;
                chunk = self.get_chunk(tenant, &sk(version, index)).await?;
            }
            match chunk {
                Some(chunk) => bytes.extend_from_slice(&chunk.data),
                None => return Ok(None),
            }
        }
        Ok(Some(bytes))
    }

    async fn plugin(&self, tenant: &str, version: &str) -> Result<Option<PluginMeta>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key(model::tenant_pk(tenant), model::plugin_meta_sk(version))))
            .send()
            .await
            .map_err(|e| unavailable("get_item (plugin)", e))?;
        Ok(out.item.and_then(|item| self.decode(item)))
    }

    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginMeta>> {
        let mut metas: Vec<PluginMeta> = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND begins_with(sk, :plugin)",
            // The chunks share the partition; only the metadata comes back.
            filter: Some("#t = :meta"),
            names: vec![("#t", "type")],
            values: vec![(":pk", s(&model::tenant_pk(tenant))), (":plugin", s("PLUGIN#")), (":meta", s("plugin"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            metas.extend(self.decode(item));
            Ok(true)
        })
        .await?;
        metas.sort_by_key(|m| m.uploaded_at);
        Ok(metas)
    }

    async fn set_plugin_status(
        &self,
        tenant: &str,
        version: &str,
        status: PluginStatus,
        reason: Option<&str>,
    ) -> Result<()> {
        let status = serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::tenant_pk(tenant), model::plugin_meta_sk(version))))
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":s", s(&status));
        update = match reason {
            Some(reason) => {
                update.update_expression("SET #s = :s, reason = :r").expression_attribute_values(":r", s(reason))
            }
            None => update.update_expression("SET #s = :s REMOVE reason"),
        };
        match update.send().await {
            Ok(_) => Ok(()),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(()),
            Err(err) => Err(unavailable("update_item (plugin)", err)),
        }
    }

    async fn active_plugin(&self, tenant: &str) -> Result<Option<PluginActive>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.into())))
            .send()
            .await
            .map_err(|e| unavailable("get_item (active plugin)", e))?;
        Ok(out.item.and_then(|item| self.decode(item)))
    }

    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> Result<()> {
        match version {
            Some(version) => {
                self.client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(encode(&PluginActive::new(tenant, version))?))
                    .send()
                    .await
                    .map_err(|e| unavailable("put_item (active plugin)", e))?;
            }
            None => {
                self.client
                    .delete_item()
                    .table_name(&self.table)
                    .set_key(Some(key(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.into())))
                    .send()
                    .await
                    .map_err(|e| unavailable("delete_item (active plugin)", e))?;
            }
        }
        Ok(())
    }

    async fn set_active_plugin_if(&self, pointer: &PluginActive, expected: &str) -> Result<bool> {
        let put = self.client.put_item().table_name(&self.table).set_item(Some(encode(pointer)?));
        let put = if expected == model::NO_POINTER {
            put.condition_expression("attribute_not_exists(pk)")
        } else if let Some(named) = expected.strip_prefix(model::UNREVISED) {
            put.condition_expression("attribute_not_exists(revision) AND version = :v")
                .expression_attribute_values(":v", AttributeValue::S(named.to_string()))
        } else {
            put.condition_expression("revision = :r")
                .expression_attribute_values(":r", AttributeValue::S(expected.to_string()))
        };
        match put.send().await {
            Ok(_) => Ok(true),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(false),
            Err(err) => Err(unavailable("put_item (active plugin, conditional)", err)),
        }
    }

    async fn plugin_config(&self, tenant: &str) -> Result<Option<model::PluginConfig>> {
        self.get_typed("get_item (plugin config)", key(model::tenant_pk(tenant), model::PLUGIN_CONFIG_SK.into())).await
    }

    async fn put_plugin_config(&self, config: &model::PluginConfig) -> Result<()> {
        if config.values.is_empty() {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(config.pk.clone(), config.sk.clone())))
                .send()
                .await
                .map_err(|e| unavailable("delete_item (plugin config)", e))?;
            return Ok(());
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(config)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (plugin config)", e))?;
        Ok(())
    }
}
