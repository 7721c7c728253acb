//! A tenant's settings, its plugin configuration and its own identity provider or secret.

use super::*;

/// A tenant's settings (`roomcast tenant set`); unset fields take the deployment's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantSettings {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    /// Rooms with more users than this announce no `joined`/`left`; they offer counts and `who`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_announce_max_users: Option<u64>,
    /// Rate limits of its own over the deployment's, by name (`messages_per_connection`, …;
    /// `crate::limits::NAMES`), 0 meaning none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rate_limits: std::collections::BTreeMap<String, u32>,
    /// Rooms that keep their latest message (room-name patterns, [`room_matches`]): joining one
    /// delivers its newest message the joiner may see, before anything else the room says.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latest_on_join: Vec<String>,
    /// Where the tenant's backend hears what happens in its rooms (the processor's `webhook`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSettings>,
}

/// A tenant's webhook: its URL, the secret its deliveries are signed with, and the event types
/// it wants (none named: all but the messages').
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSettings {
    pub url: String,
    /// Given out by no API (empty in their answers); an empty one in a change keeps the stored.
    #[serde(default)]
    pub secret: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

impl WebhookSettings {
    /// The shortest secret.
    pub const MIN_SECRET_BYTES: usize = 16;

    /// Whether it can be used: an `http(s)` URL and a secret of at least
    /// [`Self::MIN_SECRET_BYTES`]. (Event types are checked where they are known.)
    pub fn check(&self) -> Result<(), String> {
        if !(self.url.starts_with("https://") || self.url.starts_with("http://")) {
            return Err(format!("webhook URL {:?}: it must be http:// or https://", self.url));
        }
        if self.secret.len() < Self::MIN_SECRET_BYTES {
            return Err(format!("a webhook secret is at least {} bytes", Self::MIN_SECRET_BYTES));
        }
        Ok(())
    }
}

impl TenantSettings {
    /// The most patterns of rooms that keep their latest message.
    pub const MAX_LATEST_ON_JOIN: usize = 64;

    /// Whether joining `room` delivers its latest message.
    pub fn keeps_latest(&self, room: &str) -> bool {
        room_matches(&self.latest_on_join, room)
    }
}

impl TenantSettings {
    pub fn new(tenant: &str) -> TenantSettings {
        TenantSettings {
            pk: tenant_pk(tenant),
            sk: SETTINGS_SK.into(),
            record_type: "settings".into(),
            tenant: tenant.to_string(),
            presence_announce_max_users: None,
            rate_limits: Default::default(),
            latest_on_join: Vec::new(),
            webhook: None,
        }
    }
}

/// A tenant's configuration for its plugin: key/value pairs the plugin reads through
/// `host.config` (`roomcast plugin config set --tenant T KEY=VALUE`). One item per tenant, at
/// most [`PluginConfig::MAX_BYTES`]; every processor reads it with the tenant's `ACTIVE` pointer,
/// once per batch, so a change takes effect everywhere from the next batch on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    #[serde(default)]
    pub values: std::collections::BTreeMap<String, String>,
    #[serde(with = "ts_format")]
    pub updated_at: DateTime<Utc>,
}

impl PluginConfig {
    /// Keys and values together, in bytes.
    pub const MAX_BYTES: usize = 16 << 10;
    /// The longest key.
    pub const MAX_KEY_BYTES: usize = 128;

    pub fn new(
        tenant: &str,
        values: std::collections::BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> Result<PluginConfig, String> {
        for key in values.keys() {
            let fine = !key.is_empty()
                && key.len() <= Self::MAX_KEY_BYTES
                && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !fine {
                return Err(format!(
                    "configuration key {key:?}: 1 to {} characters of A-Z, a-z, 0-9, '_', '-' and '.'",
                    Self::MAX_KEY_BYTES
                ));
            }
        }
        let size: usize = values.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > Self::MAX_BYTES {
            return Err(format!("the configuration would be {size} bytes; a tenant's is at most {}", Self::MAX_BYTES));
        }
        Ok(PluginConfig {
            pk: tenant_pk(tenant),
            sk: PLUGIN_CONFIG_SK.into(),
            record_type: "plugin-config".into(),
            tenant: tenant.to_string(),
            values,
            updated_at: now,
        })
    }
}

/// A tenant's identity settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantIdentity {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    /// An HS256 secret of the tenant's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<String>,
    /// The identity provider's JWKS (`https://…/.well-known/jwks.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Tokens issued (`iat`) at or before this (epoch seconds) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_before: Option<i64>,
    /// Per user: tokens issued at or before this are refused.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub users_revoked_before: std::collections::BTreeMap<String, i64>,
    /// Revoked token ids (`jti`), each kept until the expiry given with it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub revoked_ids: std::collections::BTreeMap<String, i64>,
    /// Per user: every token refused until this (epoch seconds), whatever its `iat` (a backend's
    /// `disconnect_user` with `refuse_until`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub users_refused_until: std::collections::BTreeMap<String, i64>,
}

pub const IDENTITY_SK: &str = "IDENTITY";

/// The most revoked token ids a tenant keeps (each until its token would have expired anyway).
pub const MAX_REVOKED_IDS: usize = 1000;
/// The most users whose tokens a tenant revokes by time (the item stays far under 400 KB).
pub const MAX_REVOKED_USERS: usize = 2000;
/// Plain http for a JWKS on this machine only (tests, a local stack).
fn loopback_http(url: &str) -> bool {
    ["http://127.0.0.1:", "http://127.0.0.1/", "http://localhost:", "http://localhost/", "http://[::1]:"]
        .iter()
        .any(|prefix| url.starts_with(prefix))
}

impl TenantIdentity {
    pub fn new(tenant: &str) -> TenantIdentity {
        TenantIdentity {
            pk: tenant_pk(tenant),
            sk: IDENTITY_SK.into(),
            record_type: "identity".into(),
            tenant: tenant.to_string(),
            ..TenantIdentity::default()
        }
    }

    /// What is wrong with these settings, if anything.
    pub fn check(&self) -> Result<(), String> {
        match (&self.hs256_secret, &self.jwks_url) {
            (Some(_), Some(_)) => return Err("a tenant's tokens are either HS256 or from a JWKS, not both".into()),
            (Some(secret), None) if secret.len() < 32 => {
                return Err("an HS256 secret must be at least 32 bytes".into());
            }
            (None, Some(url)) if !(url.starts_with("https://") || loopback_http(url)) => {
                return Err(format!("the JWKS URL {url:?} is not https (plain http only on loopback, for tests)"));
            }
            (None, Some(_)) if self.issuer.is_none() => {
                return Err("a JWKS needs the issuer its tokens carry (--issuer)".into());
            }
            // Tenants may share an identity provider (one user pool, an app client each): the
            // audience is what tells their tokens apart.
            (None, Some(_)) if self.audience.is_none() => {
                return Err("a JWKS needs the audience its tokens carry for this tenant (--audience)".into());
            }
            _ => {}
        }
        if self.revoked_ids.len() > MAX_REVOKED_IDS {
            return Err(format!("at most {MAX_REVOKED_IDS} revoked token ids"));
        }
        if self.users_refused_until.len() > MAX_REVOKED_USERS {
            return Err(format!("at most {MAX_REVOKED_USERS} users refused at once"));
        }
        if self.users_revoked_before.len() > MAX_REVOKED_USERS {
            return Err(format!(
                "at most {MAX_REVOKED_USERS} users with revoked tokens: revoke the tenant's tokens (--all) instead"
            ));
        }
        Ok(())
    }

    /// Refuses every token of `user` until `until` (the later of this and any refusal standing),
    /// dropping refusals that have ended.
    pub fn refuse_user(&mut self, user: &str, until: i64, now: i64) {
        self.users_refused_until.retain(|_, end| *end > now);
        let end = self.users_refused_until.entry(user.to_string()).or_insert(until);
        *end = (*end).max(until);
    }

    /// Whether `user` is refused at `now`.
    pub fn refused(&self, user: &str, now: i64) -> bool {
        self.users_refused_until.get(user).is_some_and(|end| now < *end)
    }

    /// Revokes one token id until `until` (its expiry), dropping ids whose tokens expired.
    pub fn revoke_id(&mut self, jti: &str, until: i64, now: i64) {
        self.revoked_ids.retain(|_, exp| *exp > now);
        self.revoked_ids.insert(jti.to_string(), until);
    }

    /// Whether these settings refuse a token of `user` issued at `iat` with id `jti`.
    pub fn revoked(&self, user: &str, iat: Option<i64>, jti: Option<&str>) -> bool {
        let issued = iat.unwrap_or(i64::MIN);
        self.revoked_before.is_some_and(|before| issued <= before)
            || self.users_revoked_before.get(user).is_some_and(|before| issued <= *before)
            || jti.is_some_and(|id| self.revoked_ids.contains_key(id))
    }
}
