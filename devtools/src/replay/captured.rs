//! What a capture itself says about the run it recorded, so that a replay with no flags decides
//! as the live run did (issue 28): the tenants' plugin configurations (applied in record order),
//! the components uploaded during the capture (reassembled from their chunk records and run
//! from the moment the `ACTIVE` pointer named them), and who each connection was (recipients
//! printed as users). What the capture cannot give — a plugin uploaded before it began — is
//! said in a warning, not silently replaced by the default rules.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_lambda_events::dynamodb::EventRecord;
use serde_dynamo::AttributeValue;

use crate::model::{ItemKind, PluginActive, PluginChunk, PluginConfig, PluginMeta};

use super::input::Item;

/// The capture's plugin records and connections, read once before the replay.
#[derive(Debug, Default)]
pub struct Captured {
    /// (tenant, version) → its metadata, as last written in the capture.
    metas: HashMap<(String, String), PluginMeta>,
    /// (tenant, version) → chunk index → bytes.
    chunks: HashMap<(String, String), BTreeMap<usize, Vec<u8>>>,
    /// Connection id → user id.
    pub users: HashMap<String, String>,
    /// Tenants with any plugin record (an upload, a pointer, a configuration) in the capture.
    pub plugin_tenants: BTreeSet<String>,
}

/// A plugin-related change the replay applies itself before the record is processed.
pub enum Apply {
    /// The tenant's configuration is now this (empty: removed).
    Config { tenant: String, values: BTreeMap<String, String> },
    /// The tenant's pointer now names this version (`None`: no plugin).
    Pointer { tenant: String, version: Option<String> },
}

fn text<'a>(item: &'a serde_dynamo::Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s),
        _ => None,
    }
}

fn kind_of(record: &EventRecord) -> Option<(ItemKind, String, String)> {
    let keys = &record.change.keys;
    let (pk, sk) = (text(keys, "pk")?, text(keys, "sk")?);
    Some((ItemKind::of(pk, sk)?, pk.to_string(), sk.to_string()))
}

/// A chunk's version, from its sort key (`CHUNK#{version}#{n}` or `PLUGIN#{version}#CHUNK#{n}`).
fn chunk_version(sk: &str) -> Option<&str> {
    sk.strip_prefix("CHUNK#").or_else(|| sk.strip_prefix("PLUGIN#"))?.split('#').next()
}

impl Captured {
    pub fn read(items: &[Item]) -> Captured {
        let mut captured = Captured::default();
        for item in items {
            let Item::Record { record } = item else { continue };
            let Some((kind, pk, sk)) = kind_of(record) else { continue };
            let image = &record.change.new_image;
            let tenant = kind.tenant(&pk).to_string();
            match kind {
                ItemKind::Connection | ItemKind::Membership => {
                    let image = if image.is_empty() { &record.change.old_image } else { image };
                    if let (Some(id), Some(user)) = (text(image, "connectionId"), text(image, "userId")) {
                        captured.users.insert(id.to_string(), user.to_string());
                    }
                }
                ItemKind::PluginMeta => {
                    captured.plugin_tenants.insert(tenant);
                    if let Ok(meta) = serde_dynamo::from_item::<_, PluginMeta>(image.clone()) {
                        captured.metas.insert((meta.tenant.clone(), meta.version.clone()), meta);
                    }
                }
                ItemKind::PluginChunk => {
                    if let (Some(version), Ok(chunk)) =
                        (chunk_version(&sk), serde_dynamo::from_item::<_, PluginChunk>(image.clone()))
                    {
                        captured
                            .chunks
                            .entry((tenant, version.to_string()))
                            .or_default()
                            .insert(chunk.index, chunk.data);
                    }
                }
                ItemKind::PluginActive | ItemKind::PluginConfig => {
                    captured.plugin_tenants.insert(tenant);
                }
                _ => {}
            }
        }
        captured
    }

    /// The component of `version`, if the capture holds all of it (checked against its sha256).
    pub fn component(&self, tenant: &str, version: &str) -> Option<(&PluginMeta, Vec<u8>)> {
        let key = (tenant.to_string(), version.to_string());
        let meta = self.metas.get(&key)?;
        let chunks = self.chunks.get(&key)?;
        if chunks.len() != meta.chunks || (0..meta.chunks).any(|i| !chunks.contains_key(&i)) {
            return None;
        }
        let bytes: Vec<u8> = chunks.values().flatten().copied().collect();
        (crate::plugins::sha256_hex(&bytes) == meta.sha256).then_some((meta, bytes))
    }

    /// What `record` changes of a tenant's plugin or configuration, if anything.
    pub fn apply(record: &EventRecord) -> Option<Apply> {
        let (kind, pk, _) = kind_of(record)?;
        let tenant = kind.tenant(&pk).to_string();
        let removed = record.event_name == "REMOVE";
        match kind {
            ItemKind::PluginConfig => {
                let values = match removed {
                    true => BTreeMap::new(),
                    false => serde_dynamo::from_item::<_, PluginConfig>(record.change.new_image.clone()).ok()?.values,
                };
                Some(Apply::Config { tenant, values })
            }
            ItemKind::PluginActive => {
                let version = match removed {
                    true => None,
                    false => {
                        Some(serde_dynamo::from_item::<_, PluginActive>(record.change.new_image.clone()).ok()?.version)
                    }
                };
                Some(Apply::Pointer { tenant, version })
            }
            _ => None,
        }
    }
}
