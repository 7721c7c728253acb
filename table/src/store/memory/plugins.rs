//! The embedded adapter's [`PluginStore`]: plugin versions, their bytes, the active one, configuration.

use super::*;

#[async_trait]
impl PluginStore for MemoryStore {
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> Result<()> {
        let mut table = self.lock();
        let key = (model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.to_string());
        if self.get::<PluginActive>(&table, &key).is_some_and(|a| a.version == version) {
            self.update(&mut table, &key, &[("authorizesJoins", Some(AttributeValue::Bool(authorizes)))]);
        }
        Ok(())
    }

    async fn put_plugin(&self, meta: &PluginMeta, chunks: &[PluginChunk]) -> Result<()> {
        let items = chunks.iter().map(encode).chain(std::iter::once(encode(meta))).collect::<Result<Vec<_>>>()?;
        let mut table = self.lock();
        for item in items {
            self.put_item(&mut table, item);
        }
        Ok(())
    }

    async fn plugin_bytes(&self, tenant: &str, version: &str, chunks: usize) -> Result<Option<Vec<u8>>> {
        let table = self.lock();
        let mut bytes = Vec::new();
        let mut sk: fn(&str, usize) -> String = model::plugin_chunk_sk;
        for index in 0..chunks {
            if index == 0 && !table.items.contains_key(&(model::tenant_pk(tenant), sk(version, 0))) {
                sk = model::legacy_plugin_chunk_sk;
            }
            let key = (model::tenant_pk(tenant), sk(version, index));
            match self.get::<PluginChunk>(&table, &key) {
                Some(chunk) => bytes.extend_from_slice(&chunk.data),
                None => return Ok(None),
            }
        }
        Ok(Some(bytes))
    }

    async fn plugin(&self, tenant: &str, version: &str) -> Result<Option<PluginMeta>> {
        let table = self.lock();
        Ok(self.get::<PluginMeta>(&table, &(model::tenant_pk(tenant), model::plugin_meta_sk(version))))
    }

    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginMeta>> {
        let table = self.lock();
        let pk = model::tenant_pk(tenant);
        let mut metas: Vec<PluginMeta> = Vec::new();
        for (key, item) in table.items.range((pk.clone(), "PLUGIN#".to_string())..(pk, "PLUGIN$".to_string())) {
            if ItemKind::of(&key.0, &key.1) == Some(ItemKind::PluginMeta) {
                metas.extend(self.decode(item));
            }
        }
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
        let mut table = self.lock();
        let key = (model::tenant_pk(tenant), model::plugin_meta_sk(version));
        let status = serde_dynamo::to_attribute_value(status)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode a plugin status: {e}")))?;
        let reason = reason.map(|r| AttributeValue::S(r.to_string()));
        self.update(&mut table, &key, &[("status", Some(status)), ("reason", reason)]);
        Ok(())
    }

    async fn active_plugin(&self, tenant: &str) -> Result<Option<PluginActive>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.to_string())))
    }

    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> Result<()> {
        let mut table = self.lock();
        let key = (model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.to_string());
        match version {
            Some(version) => {
                let item = encode(&PluginActive::new(tenant, version))?;
                self.put_item(&mut table, item);
            }
            None => {
                self.delete_item(&mut table, &key, Actor::Client);
            }
        }
        Ok(())
    }

    async fn set_active_plugin_if(&self, pointer: &PluginActive, expected: &str) -> Result<bool> {
        let mut table = self.lock();
        let key = (pointer.pk.clone(), pointer.sk.clone());
        let now: Option<PluginActive> = self.get(&table, &key);
        if PluginActive::token(now.as_ref()) != expected {
            return Ok(false);
        }
        let item = encode(pointer)?;
        self.put_item(&mut table, item);
        Ok(true)
    }

    async fn plugin_config(&self, tenant: &str) -> Result<Option<model::PluginConfig>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::tenant_pk(tenant), model::PLUGIN_CONFIG_SK.to_string())))
    }

    async fn put_plugin_config(&self, config: &model::PluginConfig) -> Result<()> {
        let mut table = self.lock();
        if config.values.is_empty() {
            self.delete_item(&mut table, &(config.pk.clone(), config.sk.clone()), Actor::Client);
        } else {
            let item = encode(config)?;
            self.put_item(&mut table, item);
        }
        Ok(())
    }
}
