//! Tenants' own identity: each tenant's `$connect` tokens are checked with that tenant's key.
//!
//! A tenant with no identity of its own is served as before: an HS256 token signed with the
//! deployment's secret, whose `tenant` claim names it. A tenant with one ([`TenantIdentity`],
//! `TENANT#{tenant}` / `IDENTITY`, set with `roomcast tenant identity`) is served only with it:
//!
//! * an HS256 secret of its own, or its identity provider's JWKS URL (RS256 or ES256 keys, by
//!   `kid`; cached [`JWKS_FRESH`], fetched again on an unknown `kid` at most every
//!   [`JWKS_REFETCH`]);
//! * `iss` (required with a JWKS) and `aud` (when set) checked;
//! * the tenant from the token's `tenant` claim, or — for an identity provider's token, which has
//!   none — from the connect URL's `?tenant=`; the claim, when present, must name the tenant whose
//!   key verified it, so a token for tenant A never admits anyone to tenant B, and the
//!   deployment's shared secret admits no one to a tenant with its own identity;
//! * revocation: every token issued before a time (the tenant's, or one user's), or one token id
//!   (`jti`). A token without `iat` counts as issued at the beginning of time.
//!
//! The algorithm is the key's, never the token's: `alg: none`, and HS256 signed with a public
//! key, are refused before any signature is checked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::auth::{Claims, Denied};
pub use crate::model::{IDENTITY_SK, MAX_REVOKED_IDS, MAX_REVOKED_USERS, TenantIdentity};
use crate::store::Store;

/// How far in the future a token's `iat` may be (clock skew): later, it could outlive a
/// revocation made before it.
pub const IAT_SKEW_SECONDS: i64 = 60;
/// The most a JWKS response may hold.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// How long a fetched JWKS is used before it is fetched again.
pub const JWKS_FRESH: Duration = Duration::from_secs(600);
/// An unknown `kid` fetches the JWKS again, at most this often (a key rotation is picked up at
/// once; junk `kid`s cannot make every connect a fetch).
pub const JWKS_REFETCH: Duration = Duration::from_secs(30);
/// How long a tenant's identity settings stand in a container.
pub const IDENTITY_FRESH: Duration = Duration::from_secs(30);

/// Each tenant's identity as this container last read it, and when.
type Identities = Arc<Mutex<HashMap<String, (Option<TenantIdentity>, Instant)>>>;

/// One JWKS URL: its keys as last fetched (if ever), and when it was last tried.
#[derive(Default)]
struct Fetched {
    keys: Option<jsonwebtoken::jwk::JwkSet>,
    tried: Option<Instant>,
    fetched: Option<Instant>,
}

/// Per JWKS URL, its own lock: a slow or failing provider holds up its own tenants' connects only.
type Jwks = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<Fetched>>>>>;

/// Checks `$connect` tokens: the deployment's shared secret, or each tenant's own identity.
#[derive(Clone)]
pub struct Verifier {
    shared: Arc<Vec<u8>>,
    store: Option<Arc<dyn Store>>,
    identities: Identities,
    jwks: Jwks,
    http: reqwest::Client,
    refetch: Duration,
}

impl Verifier {
    /// `store`: where tenants' identities are read; `None` serves the shared secret only.
    pub fn new(shared: Vec<u8>, store: Option<Arc<dyn Store>>) -> Verifier {
        // The process's TLS provider: the one the AWS SDK links (aws-lc-rs); installed once.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            // A JWKS is served where its URL says: a redirect could hand the keys to anyone.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with the process's TLS provider");
        Verifier {
            shared: Arc::new(shared),
            store,
            identities: Arc::default(),
            jwks: Arc::default(),
            http,
            refetch: JWKS_REFETCH,
        }
    }

    /// How soon an unknown `kid` may fetch the JWKS again ([`JWKS_REFETCH`] unless set).
    pub fn with_refetch(mut self, refetch: Duration) -> Verifier {
        self.refetch = refetch;
        self
    }

    /// The deployment's shared secret.
    pub fn shared_secret(&self) -> &[u8] {
        &self.shared
    }

    /// Forgets what this container read of `tenant`'s identity (after a change made here).
    pub fn forget(&self, tenant: &str) {
        self.identities.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
    }

    /// The `$connect` rule: the token's claims, checked with its tenant's key. `tenant_hint`:
    /// the connect URL's `?tenant=`, for tokens without a `tenant` claim.
    pub async fn verify_connect(&self, token: &str, tenant_hint: Option<&str>, now: i64) -> Result<Claims, Denied> {
        let token = token.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        if token.is_empty() {
            return Err(Denied::Missing);
        }
        let (header, payload) = unverified(token)?;
        let named = payload.get("tenant").and_then(|t| t.as_str()).filter(|t| !t.is_empty());
        let hint = tenant_hint.filter(|t| !t.is_empty());
        if let (Some(named), Some(hint)) = (named, hint)
            && named != hint
        {
            return Err(Denied::Claim("tenant"));
        }
        let tenant = named.or(hint).ok_or(Denied::Claim("tenant"))?;
        crate::model::Name::parse("tenant", tenant).map_err(|_| Denied::Claim("tenant"))?;
        let identity = self.identity(tenant).await?;
        let claims = match &identity {
            // The deployment's secret: the `tenant` claim names the tenant.
            None => crate::auth::verify(token, &self.shared, now)?,
            Some(id) => {
                let verified = match (&id.hs256_secret, &id.jwks_url) {
                    (Some(secret), _) => {
                        let claims = crate::auth::verify(token, secret.as_bytes(), now)?;
                        check_iss_aud(&payload, id)?;
                        claims
                    }
                    (None, Some(url)) => {
                        let value = self.verify_jwks(token, &header, url, id, now).await?;
                        crate::auth::claims_from(&value, tenant, now)?
                    }
                    (None, None) => crate::auth::verify(token, &self.shared, now)?,
                };
                if verified.tenant != tenant {
                    return Err(Denied::Claim("tenant"));
                }
                let iat = payload.get("iat").and_then(|v| v.as_i64());
                if iat.is_some_and(|iat| iat > now + IAT_SKEW_SECONDS) {
                    return Err(Denied::Claim("iat"));
                }
                if id.revoked(&verified.sub, iat, payload.get("jti").and_then(|v| v.as_str()))
                    || id.refused(&verified.sub, now)
                {
                    return Err(Denied::Revoked);
                }
                verified
            }
        };
        if claims.scope.as_deref().is_some_and(|scope| scope.split_whitespace().any(|s| s == "publish")) {
            return Err(Denied::PublishToken);
        }
        Ok(claims)
    }

    async fn identity(&self, tenant: &str) -> Result<Option<TenantIdentity>, Denied> {
        let Some(store) = &self.store else { return Ok(None) };
        if let Some((identity, at)) = self.identities.lock().unwrap_or_else(|p| p.into_inner()).get(tenant)
            && at.elapsed() < IDENTITY_FRESH
        {
            return Ok(identity.clone());
        }
        let identity = store.tenant_identity(tenant).await.map_err(|e| Denied::Unavailable(e.to_string()))?;
        let mut cache = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(tenant.to_string(), (identity.clone(), Instant::now()));
        Ok(identity)
    }

    async fn verify_jwks(
        &self,
        token: &str,
        header: &serde_json::Value,
        url: &str,
        id: &TenantIdentity,
        now: i64,
    ) -> Result<serde_json::Value, Denied> {
        use jsonwebtoken::Algorithm;
        let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("none");
        // Only the algorithms a JWKS key can have: `none` and HS256 (a public key used as an
        // HMAC secret) never reach a signature check.
        let algorithm = match alg {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => return Err(Denied::Algorithm(other.to_string())),
        };
        let kid = header.get("kid").and_then(|k| k.as_str()).ok_or(Denied::Claim("kid"))?;
        let jwk = self.key(url, kid).await?;
        // The key decides: an RS256 header on an EC key (or the reverse) is refused.
        let matches = matches!(
            (&jwk.algorithm, algorithm),
            (jsonwebtoken::jwk::AlgorithmParameters::RSA(_), Algorithm::RS256)
                | (jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_), Algorithm::ES256)
        );
        if !matches {
            return Err(Denied::Algorithm(format!("{alg} for a key of another kind")));
        }
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|_| Denied::Signature)?;
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.leeway = 0;
        validation.validate_exp = false; // checked below against `now`, as for every token
        validation.required_spec_claims =
            ["exp".to_string(), "sub".to_string(), "iss".to_string(), "aud".to_string()].into();
        validation.set_issuer(&[id.issuer.as_deref().unwrap_or_default()]);
        match &id.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidIssuer => Denied::Claim("iss"),
                ErrorKind::InvalidAudience => Denied::Claim("aud"),
                ErrorKind::MissingRequiredClaim(name) if name == "iss" => Denied::Claim("iss"),
                ErrorKind::MissingRequiredClaim(name) if name == "sub" => Denied::Claim("sub"),
                ErrorKind::MissingRequiredClaim(name) if name == "aud" => Denied::Claim("aud"),
                ErrorKind::MissingRequiredClaim(_) => Denied::Claim("exp"),
                ErrorKind::InvalidSignature => Denied::Signature,
                _ => Denied::Malformed(e.to_string()),
            }
        })?;
        let exp = data.claims.get("exp").and_then(|v| v.as_i64()).ok_or(Denied::Claim("exp"))?;
        if exp <= now {
            return Err(Denied::Expired);
        }
        Ok(data.claims)
    }

    /// The key `kid` of the JWKS at `url`: cached, fetched when stale, and fetched again for an
    /// unknown `kid` (a rotation) at most every [`JWKS_REFETCH`].
    async fn key(&self, url: &str, kid: &str) -> Result<jsonwebtoken::jwk::Jwk, Denied> {
        let slot = {
            let mut all = self.jwks.lock().unwrap_or_else(|p| p.into_inner());
            if all.len() > 10_000 {
                all.clear();
            }
            all.entry(url.to_string()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        let find = |slot: &Fetched| slot.keys.as_ref().and_then(|keys| keys.find(kid).cloned());
        let fresh = slot.fetched.is_some_and(|at| at.elapsed() < JWKS_FRESH);
        if fresh && let Some(key) = find(&slot) {
            return Ok(key);
        }
        // A fetch was tried lately (found nothing new, or failed): not again yet, whatever the
        // kid — junk kids or a provider that is down cannot make every connect a fetch.
        if slot.tried.is_none_or(|at| at.elapsed() >= self.refetch) {
            slot.tried = Some(Instant::now());
            match self.fetch(url).await {
                Ok(keys) => {
                    slot.keys = Some(keys);
                    slot.fetched = Some(Instant::now());
                }
                // Keys fetched before still serve while the provider is down.
                Err(error) => tracing::warn!(url, %error, "the tenant's JWKS could not be fetched"),
            }
        }
        match (&slot.keys, find(&slot)) {
            (_, Some(key)) => Ok(key),
            (None, None) => Err(Denied::Unavailable("the tenant's JWKS could not be fetched".into())),
            (Some(_), None) => Err(Denied::UnknownKey(kid.to_string())),
        }
    }

    async fn fetch(&self, url: &str) -> Result<jsonwebtoken::jwk::JwkSet, String> {
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        if response.content_length().is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(format!("{url} answered more than {MAX_JWKS_BYTES} bytes"));
        }
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!("{url} answered more than {MAX_JWKS_BYTES} bytes"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("{url} is not a JWKS: {e}"))
    }
}

fn check_iss_aud(payload: &serde_json::Value, id: &TenantIdentity) -> Result<(), Denied> {
    if let Some(issuer) = &id.issuer
        && payload.get("iss").and_then(|v| v.as_str()) != Some(issuer)
    {
        return Err(Denied::Claim("iss"));
    }
    if let Some(audience) = &id.audience {
        let ok = match payload.get("aud") {
            Some(serde_json::Value::String(aud)) => aud == audience,
            Some(serde_json::Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !ok {
            return Err(Denied::Claim("aud"));
        }
    }
    Ok(())
}

/// A token's header and payload, not yet verified: only to find whose key checks it.
fn unverified(token: &str) -> Result<(serde_json::Value, serde_json::Value), Denied> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Denied::Malformed("expected three dot-separated parts".into()));
    };
    let decode = |part: &str, what: &str| -> Result<serde_json::Value, Denied> {
        let bytes =
            URL_SAFE_NO_PAD.decode(part).map_err(|e| Denied::Malformed(format!("{what} is not base64url: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| Denied::Malformed(format!("{what} is not JSON: {e}")))
    };
    Ok((decode(header, "header")?, decode(payload, "payload")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked_and_revocations_apply() {
        let mut id = TenantIdentity::new("acme");
        id.hs256_secret = Some("short".into());
        assert!(id.check().unwrap_err().contains("32 bytes"));
        id.hs256_secret = Some("x".repeat(32));
        id.jwks_url = Some("https://idp.example/jwks".into());
        assert!(id.check().unwrap_err().contains("not both"));
        id.hs256_secret = None;
        assert!(id.check().unwrap_err().contains("issuer"));
        id.issuer = Some("https://idp.example".into());
        assert!(id.check().unwrap_err().contains("audience"));
        id.audience = Some("roomcast".into());
        assert_eq!(id.check(), Ok(()));

        id.revoked_before = Some(100);
        assert!(id.revoked("ann", Some(100), None) && !id.revoked("ann", Some(101), None));
        assert!(id.revoked("ann", None, None), "no iat: issued before any time");
        id.users_revoked_before.insert("bob".into(), 500);
        id.refuse_user("cat", 900, 100);
        id.refuse_user("cat", 800, 100);
        assert!(
            id.refused("cat", 899) && !id.refused("cat", 900) && !id.refused("ann", 100),
            "the later refusal stands"
        );
        id.refuse_user("dan", 2000, 950);
        assert!(!id.users_refused_until.contains_key("cat"), "an ended refusal is dropped");
        assert!(id.revoked("bob", Some(400), None) && !id.revoked("ann", Some(400), None));
        id.revoke_id("t-1", 2000, 1000);
        id.revoke_id("t-0", 900, 800);
        assert!(id.revoked("ann", Some(600), Some("t-1")) && !id.revoked("ann", Some(600), Some("t-3")));
        assert!(id.revoked_ids.contains_key("t-0"), "kept until it expires");
        id.revoke_id("t-3", 3000, 1000);
        assert!(!id.revoked_ids.contains_key("t-0"), "dropped once its token expired");
    }
}
