//! The `$connect` authorizer's rule, shared by the deployed REQUEST authorizer and the local
//! gateway: an HS256 JWT with `tenant` and `sub` claims and an `exp`, from the `token` query
//! parameter only — the authorizer's identity source in `template.yaml`, so API Gateway answers
//! 401 without one, and browsers cannot set headers on a WebSocket anyway. A token in an
//! `Authorization` header is refused by the local gateway too, with that reason. Allowed callers get a flat context
//! (`tenant`, `userId`); everything else is denied. The token itself is never logged.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::model::Name;

/// The claims Roomcast reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub tenant: String,
    pub sub: String,
    /// Expiry, epoch seconds. Required.
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Space-separated scopes: `publish` lets a tenant's backend publish into its tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The rooms this token may join, as names or prefixes ending in `*` (`["support-*",
    /// "team-42"]`), as Centrifugo's `channels` claim. Absent: any room of the tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// The token's other claims whose values are strings, numbers or booleans (a `role`, a
    /// `plan`), passed on to the tenant's `authorize-join` through the authorizer's context:
    /// at most [`MAX_EXTRA_CLAIMS_BYTES`], names and values together.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, serde_json::Value>,
}

/// Claims the authorizer reads itself, or that mean nothing to a plugin.
const RESERVED: &[&str] = &[
    "tenant",
    "sub",
    "exp",
    "nbf",
    "iat",
    "scope",
    "rooms",
    "iss",
    "aud",
    "jti",
    "userId",
    "principalId",
    "integrationLatency",
];

/// The other claims passed on, names and values together.
pub const MAX_EXTRA_CLAIMS_BYTES: usize = 1024;
/// The `rooms` claim as JSON text, at most (it travels in the context too).
pub const MAX_ROOMS_CLAIM_BYTES: usize = 2048;

/// Whether the `rooms` claim's `patterns` allow `room`: a name equal to it, or a prefix ending
/// in `*` that it starts with.
pub fn room_allowed(patterns: &[String], room: &str) -> bool {
    crate::model::room_matches(patterns, room)
}

/// The most patterns a `rooms` claim may hold (it travels in the authorizer's context).
pub const MAX_ROOM_PATTERNS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no token: pass ?token=… (API Gateway reads the token from the query string only, not from a header)")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {0:?} is not accepted for this tenant")]
    Algorithm(String),
    #[error("token signature does not verify")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token has no valid {0} claim")]
    Claim(&'static str),
    #[error("a publish token cannot open a connection")]
    PublishToken,
    #[error("token revoked")]
    Revoked,
    #[error("no key {0:?} in the tenant's JWKS")]
    UnknownKey(String),
    /// The tenant's identity could not be read (the table, its JWKS): not the caller's fault.
    #[error("identity unavailable: {0}")]
    Unavailable(String),
}

impl Denied {
    /// What API Gateway answers: 401 without credentials, 403 with bad ones.
    pub fn status(&self) -> u16 {
        match self {
            Denied::Missing => 401,
            Denied::Unavailable(_) => 503,
            _ => 403,
        }
    }
}

/// The longest user id (`sub`) a token may carry, in bytes (the records' rule, [`crate::model`]).
pub use crate::model::MAX_USER_ID_BYTES;

/// Checks `token` against `secret` at `now` (epoch seconds).
pub fn verify(token: &str, secret: &[u8], now: i64) -> Result<Claims, Denied> {
    let token = token.trim();
    let token = token.strip_prefix("Bearer ").unwrap_or(token);
    if token.is_empty() {
        return Err(Denied::Missing);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Denied::Malformed("expected three dot-separated parts".into()));
    };
    let decode = |part: &str, what: &str| {
        URL_SAFE_NO_PAD.decode(part).map_err(|e| Denied::Malformed(format!("{what} is not base64url: {e}")))
    };
    let header: serde_json::Value = serde_json::from_slice(&decode(header, "header")?)
        .map_err(|e| Denied::Malformed(format!("header is not JSON: {e}")))?;
    match header.get("alg").and_then(|a| a.as_str()) {
        Some("HS256") => {}
        other => return Err(Denied::Algorithm(other.unwrap_or("none").to_string())),
    }
    let signed = &token[..token.len() - signature.len() - 1];
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| Denied::Signature)?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&decode(signature, "signature")?).map_err(|_| Denied::Signature)?;

    let claims: serde_json::Value = serde_json::from_slice(&decode(payload, "payload")?)
        .map_err(|e| Denied::Malformed(format!("payload is not JSON: {e}")))?;
    let tenant = claims.get("tenant").and_then(|v| v.as_str()).filter(|s| !s.is_empty());
    claims_from(&claims, tenant.ok_or(Denied::Claim("tenant"))?, now)
}

/// The claims Roomcast reads from a verified token's payload, for `tenant` (its `tenant` claim,
/// or — for an identity provider's token, which has none — the tenant whose key verified it).
pub fn claims_from(claims: &serde_json::Value, tenant: &str, now: i64) -> Result<Claims, Denied> {
    let text = |name: &'static str| claims.get(name).and_then(|v| v.as_str()).filter(|s| !s.is_empty());
    Name::parse("tenant", tenant).map_err(|_| Denied::Claim("tenant"))?;
    // A user id is part of keys (`USER#{sub}` for presence) and of every frame: bounded, and
    // without the key separator or control characters.
    let sub = text("sub")
        .filter(|s| s.len() <= MAX_USER_ID_BYTES && !s.chars().any(|c| c == '#' || c.is_control()))
        .ok_or(Denied::Claim("sub"))?;
    let exp = claims.get("exp").and_then(|v| v.as_i64()).ok_or(Denied::Claim("exp"))?;
    let nbf = claims.get("nbf").and_then(|v| v.as_i64());
    if exp <= now {
        return Err(Denied::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now) {
        return Err(Denied::NotYetValid);
    }
    let scope = claims.get("scope").and_then(|v| v.as_str()).map(str::to_string);
    let rooms = match claims.get("rooms") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Array(list)) if list.len() <= MAX_ROOM_PATTERNS => Some(
            list.iter()
                .map(|v| v.as_str().filter(|p| !p.is_empty() && p.len() <= 128).map(str::to_string))
                .collect::<Option<Vec<String>>>()
                .ok_or(Denied::Claim("rooms"))?,
        ),
        Some(_) => return Err(Denied::Claim("rooms")),
    };
    if rooms.as_ref().is_some_and(|r| serde_json::to_string(r).map_or(usize::MAX, |t| t.len()) > MAX_ROOMS_CLAIM_BYTES)
    {
        return Err(Denied::Claim("rooms"));
    }
    let mut extra = std::collections::BTreeMap::new();
    let mut size = 0;
    for (name, value) in claims.as_object().into_iter().flatten() {
        if RESERVED.contains(&name.as_str()) || !(value.is_string() || value.is_number() || value.is_boolean()) {
            continue;
        }
        size += name.len() + value.to_string().len();
        if size > MAX_EXTRA_CLAIMS_BYTES {
            return Err(Denied::Claim("size of the other claims"));
        }
        extra.insert(name.clone(), value.clone());
    }
    Ok(Claims { tenant: tenant.to_string(), sub: sub.to_string(), exp, nbf, scope, rooms, extra })
}

/// The `$connect` rule: [`verify`], and a backend's publish-scoped token is not a user's (it
/// cannot be revoked apart from the secret, so it must not open connections too).
pub fn verify_connect(token: &str, secret: &[u8], now: i64) -> Result<Claims, Denied> {
    let claims = verify(token, secret, now)?;
    if claims.scope.as_deref().is_some_and(|scope| scope.split_whitespace().any(|s| s == "publish")) {
        return Err(Denied::PublishToken);
    }
    Ok(claims)
}

/// Signs claims as an HS256 JWT (dev tokens, tests).
pub fn mint(claims: &Claims, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    // Other claims never stand in for the ones the authorizer reads.
    let mut claims = claims.clone();
    claims.extra.retain(|name, _| !RESERVED.contains(&name.as_str()));
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signed = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// The context an allowed caller gets: flat, as API Gateway passes it to `$connect`.
/// A `rooms` claim travels as its JSON text (context values are strings, numbers or booleans).
pub fn context(claims: &Claims) -> std::collections::HashMap<String, serde_json::Value> {
    let mut context = std::collections::HashMap::from([
        ("tenant".to_string(), serde_json::Value::String(claims.tenant.clone())),
        ("userId".to_string(), serde_json::Value::String(claims.sub.clone())),
        ("principalId".to_string(), serde_json::Value::String(claims.sub.clone())),
        // The connection keeps it: frames after it are refused until a `refresh`.
        ("exp".to_string(), serde_json::Value::from(claims.exp)),
    ]);
    if let Some(rooms) = &claims.rooms {
        let text = serde_json::to_string(rooms).unwrap_or_default();
        context.insert("rooms".to_string(), serde_json::Value::String(text));
    }
    for (name, value) in &claims.extra {
        context.entry(name.clone()).or_insert_with(|| value.clone());
    }
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    #[test]
    fn a_user_id_that_is_too_long_or_has_a_separator_is_refused() {
        let exp = 4_000_000_000;
        for sub in ["x".repeat(MAX_USER_ID_BYTES + 1), "a#b".to_string(), "a\nb".to_string()] {
            let token = mint(
                &Claims {
                    tenant: "acme".into(),
                    sub,
                    exp,
                    nbf: None,
                    scope: None,
                    rooms: None,
                    extra: Default::default(),
                },
                SECRET,
            );
            assert_eq!(verify(&token, SECRET, 0), Err(Denied::Claim("sub")));
        }
        let token = mint(
            &Claims {
                tenant: "acme".into(),
                sub: "x".repeat(MAX_USER_ID_BYTES),
                exp,
                nbf: None,
                scope: None,
                rooms: None,
                extra: Default::default(),
            },
            SECRET,
        );
        assert!(verify(&token, SECRET, 0).is_ok());
    }

    /// A token of any payload, signed: what `mint` cannot make (claims of the wrong type).
    fn signed_raw(payload: &serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload.to_string()));
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn a_rooms_claim_limits_rooms_by_name_and_prefix_and_travels_in_the_context() {
        let patterns = vec!["support-*".to_string(), "team-42".to_string()];
        assert!(room_allowed(&patterns, "support-1") && room_allowed(&patterns, "team-42"));
        assert!(!room_allowed(&patterns, "team-420") && !room_allowed(&patterns, "general"));
        let limited = Claims { rooms: Some(patterns.clone()), ..claims(4_000_000_000) };
        let verified = verify(&mint(&limited, SECRET), SECRET, 0).unwrap();
        assert_eq!(verified.rooms.as_deref(), Some(&patterns[..]));
        assert_eq!(context(&verified)["rooms"], serde_json::json!(r#"["support-*","team-42"]"#));
        // Not a list of names: refused, not read as "any room".
        let mut raw = serde_json::to_value(claims(4_000_000_000)).unwrap();
        raw["rooms"] = serde_json::json!("support-*");
        assert_eq!(verify(&signed_raw(&raw), SECRET, 0), Err(Denied::Claim("rooms")));

        // Other plain claims travel too (a plugin may read a `role`); objects do not.
        let mut raw = serde_json::to_value(claims(4_000_000_000)).unwrap();
        raw["role"] = serde_json::json!("admin");
        raw["nested"] = serde_json::json!({"a": 1});
        let verified = verify(&signed_raw(&raw), SECRET, 0).unwrap();
        assert_eq!(context(&verified)["role"], "admin");
        assert!(!context(&verified).contains_key("nested"));
    }

    #[test]
    fn a_publish_token_cannot_open_a_connection() {
        let publish = Claims {
            tenant: "acme".into(),
            sub: "shop".into(),
            exp: 4_000_000_000,
            nbf: None,
            scope: Some("publish".into()),
            rooms: None,
            extra: Default::default(),
        };
        let token = mint(&publish, SECRET);
        assert!(verify(&token, SECRET, 0).is_ok());
        assert_eq!(verify_connect(&token, SECRET, 0), Err(Denied::PublishToken));
        let user = mint(&Claims { scope: None, ..publish }, SECRET);
        assert!(verify_connect(&user, SECRET, 0).is_ok());
    }

    fn claims(exp: i64) -> Claims {
        Claims {
            tenant: "acme".into(),
            sub: "ann".into(),
            exp,
            nbf: None,
            scope: None,
            rooms: None,
            extra: Default::default(),
        }
    }

    fn sign_raw(payload: &str, secret: &[u8]) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
        let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(payload));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn a_valid_token_yields_its_claims_and_a_flat_context() {
        let token = mint(&claims(2000), SECRET);
        assert_eq!(verify(&token, SECRET, 1000), Ok(claims(2000)));
        assert_eq!(verify(&format!("Bearer {token}"), SECRET, 1000), Ok(claims(2000)));
        let ctx = context(&claims(2000));
        assert_eq!(ctx["tenant"], "acme");
        assert_eq!(ctx["userId"], "ann");
    }

    #[test]
    fn every_bad_token_is_denied_for_a_specific_reason() {
        let good = mint(&claims(2000), SECRET);
        assert_eq!(verify("", SECRET, 1000), Err(Denied::Missing));
        assert_eq!(verify(&good, SECRET, 2000), Err(Denied::Expired));
        assert_eq!(verify(&good, b"other-secret", 1000), Err(Denied::Signature));
        assert!(matches!(verify("a.b", SECRET, 1000), Err(Denied::Malformed(_))));
        assert!(matches!(verify("%%%.%%%.%%%", SECRET, 1000), Err(Denied::Malformed(_))));
        let none_alg = format!("{}.{}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#), URL_SAFE_NO_PAD.encode(b"{}"));
        assert_eq!(verify(&none_alg, SECRET, 1000), Err(Denied::Algorithm("none".into())));
        assert_eq!(
            verify(&sign_raw(r#"{"sub":"ann","exp":2000}"#, SECRET), SECRET, 1000),
            Err(Denied::Claim("tenant"))
        );
        assert_eq!(
            verify(&sign_raw(r#"{"tenant":"acme","exp":2000}"#, SECRET), SECRET, 1000),
            Err(Denied::Claim("sub"))
        );
        assert_eq!(
            verify(&sign_raw(r#"{"tenant":"acme","sub":"ann"}"#, SECRET), SECRET, 1000),
            Err(Denied::Claim("exp"))
        );
        assert_eq!(
            verify(&sign_raw(r#"{"tenant":"a#b","sub":"ann","exp":2000}"#, SECRET), SECRET, 1000),
            Err(Denied::Claim("tenant"))
        );
        let early = sign_raw(r#"{"tenant":"acme","sub":"ann","exp":2000,"nbf":1500}"#, SECRET);
        assert_eq!(verify(&early, SECRET, 1000), Err(Denied::NotYetValid));
        let mut tampered = good.clone();
        tampered.insert(good.find('.').unwrap() + 2, 'x');
        assert!(verify(&tampered, SECRET, 1000).is_err());
        assert_eq!(Denied::Missing.status(), 401);
        assert_eq!(Denied::Signature.status(), 403);
    }
}
