//! Tenants' own identity ([`roomcast::identity`]): tokens from a tenant's identity provider,
//! checked against its JWKS served on loopback (RS256 and ES256), or with an HS256 secret of the
//! tenant's own; wrong `kid`, `iss` and `aud`; revocation; a key rotation; `alg: none` and
//! HS256-signed-with-the-public-key; and no tenant's key ever admitting anyone to another.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use roomcast::auth::Denied;
use roomcast::identity::{TenantIdentity, Verifier};
use roomcast::store::Store;
use serde_json::{Value, json};

const SHARED: &[u8] = b"the-deployment-shared-secret";
const ISSUER: &str = "https://idp.test";
const NOW: i64 = 1_800_000_000;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/fixtures/identity/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn jwk(kid: &str) -> Value {
    serde_json::from_slice::<Value>(&fixture(&format!("{kid}.jwk.json"))).unwrap()["keys"][0].clone()
}

/// An identity provider's JWKS on loopback: what it serves can change (a rotation), and its
/// fetches are counted.
struct Jwks {
    url: String,
    keys: Arc<Mutex<Value>>,
    fetches: Arc<Mutex<usize>>,
}

async fn jwks(kids: &[&str]) -> Jwks {
    let keys = Arc::new(Mutex::new(json!({ "keys": kids.iter().map(|k| jwk(k)).collect::<Vec<_>>() })));
    let fetches = Arc::new(Mutex::new(0));
    let (served, counted) = (keys.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let (served, counted) = (served.clone(), counted.clone());
            async move {
                *counted.lock().unwrap() += 1;
                axum::Json(served.lock().unwrap().clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Jwks { url: format!("http://{addr}/.well-known/jwks.json"), keys, fetches }
}

impl Jwks {
    fn serve(&self, kids: &[&str]) {
        *self.keys.lock().unwrap() = json!({ "keys": kids.iter().map(|k| jwk(k)).collect::<Vec<_>>() });
    }
}

/// A token as the identity provider signs it: `kid` names the key (and its algorithm).
fn idp_token(kid: &str, claims: Value) -> String {
    let (algorithm, key) = match kid {
        "ec-1" => (Algorithm::ES256, EncodingKey::from_ec_pem(&fixture("ec-1.pem")).unwrap()),
        _ => (Algorithm::RS256, EncodingKey::from_rsa_pem(&fixture(&format!("{kid}.pem"))).unwrap()),
    };
    let header = Header { kid: Some(kid.to_string()), ..Header::new(algorithm) };
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn standard(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": "roomcast", "sub": sub, "exp": NOW + 600, "iat": NOW - 10})
}

/// A token with this header, signed HS256 with `secret` (whatever the header says).
fn hs256_with(header: Value, claims: &Value, secret: &[u8]) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let signed = format!("{}.{}", b64(&header), b64(claims));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signed.as_bytes());
    format!("{signed}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

async fn with_idp(kids: &[&str]) -> (Jwks, Arc<dyn Store>, Verifier) {
    let idp = jwks(kids).await;
    let clock = roomcast::model::ManualClock::starting_now();
    let store: Arc<dyn Store> = roomcast::store::memory::MemoryStore::new(clock);
    let mut acme = TenantIdentity::new("acme");
    acme.jwks_url = Some(idp.url.clone());
    acme.issuer = Some(ISSUER.into());
    acme.audience = Some("roomcast".into());
    acme.check().unwrap();
    store.put_tenant_identity(&acme).await.unwrap();
    let mut beta = TenantIdentity::new("beta");
    beta.hs256_secret = Some("beta's-own-secret-of-32-bytes-or-more".into());
    store.put_tenant_identity(&beta).await.unwrap();
    // An unknown kid may fetch again at once here (30 s in a deployment).
    let verifier = Verifier::new(SHARED.to_vec(), Some(store.clone())).with_refetch(Duration::ZERO);
    (idp, store, verifier)
}

#[tokio::test]
async fn an_identity_providers_rs256_and_es256_tokens_admit_their_tenants_users_only() {
    let (idp, _, verifier) = with_idp(&["rsa-a", "ec-1"]).await;
    for kid in ["rsa-a", "ec-1"] {
        // No `tenant` claim (an identity provider's token): the URL's `?tenant=` names it.
        let claims = verifier.verify_connect(&idp_token(kid, standard("ann")), Some("acme"), NOW).await.unwrap();
        assert_eq!((claims.tenant.as_str(), claims.sub.as_str()), ("acme", "ann"), "{kid}");
    }
    assert_eq!(*idp.fetches.lock().unwrap(), 1, "the JWKS is fetched once and kept");
    let deny = |token: String, hint: Option<&'static str>| {
        let verifier = verifier.clone();
        async move { verifier.verify_connect(&token, hint, NOW).await.unwrap_err() }
    };
    assert_eq!(deny(idp_token("rsa-a", standard("ann")), None).await, Denied::Claim("tenant"), "no tenant at all");
    assert_eq!(
        deny(
            idp_token("rsa-a", json!({"iss": "https://evil.test", "aud": "roomcast", "sub": "ann", "exp": NOW + 600})),
            Some("acme")
        )
        .await,
        Denied::Claim("iss")
    );
    assert_eq!(
        deny(
            idp_token("rsa-a", json!({"iss": ISSUER, "aud": "another-app", "sub": "ann", "exp": NOW + 600})),
            Some("acme")
        )
        .await,
        Denied::Claim("aud")
    );
    assert_eq!(
        deny(idp_token("rsa-a", json!({"iss": ISSUER, "aud": "roomcast", "sub": "ann", "exp": NOW - 1})), Some("acme"))
            .await,
        Denied::Expired
    );
    // No `aud` at all (a Cognito access token): another tenant's app could have asked for it.
    let no_aud = idp_token("rsa-a", json!({"iss": ISSUER, "sub": "ann", "exp": NOW + 600}));
    assert_eq!(deny(no_aud, Some("acme")).await, Denied::Claim("aud"));
    // Issued in the future: it could outlive a revocation made before it.
    let mut later = standard("ann");
    later["iat"] = json!(NOW + 3600);
    assert_eq!(deny(idp_token("rsa-a", later), Some("acme")).await, Denied::Claim("iat"));
    // A `tenant` claim and `?tenant=` that disagree.
    let mut named = standard("ann");
    named["tenant"] = json!("acme");
    assert_eq!(deny(idp_token("rsa-a", named), Some("beta")).await, Denied::Claim("tenant"));
    // A kid the JWKS does not have (fetched again, still not there).
    let unknown = {
        let claims = standard("ann");
        let key = EncodingKey::from_rsa_pem(&fixture("rsa-b.pem")).unwrap();
        jsonwebtoken::encode(&Header { kid: Some("nope".into()), ..Header::new(Algorithm::RS256) }, &claims, &key)
            .unwrap()
    };
    assert_eq!(deny(unknown, Some("acme")).await, Denied::UnknownKey("nope".into()));
    // A real kid, but signed with another key.
    let forged = {
        let key = EncodingKey::from_rsa_pem(&fixture("rsa-b.pem")).unwrap();
        let header = Header { kid: Some("rsa-a".into()), ..Header::new(Algorithm::RS256) };
        jsonwebtoken::encode(&header, &standard("ann"), &key).unwrap()
    };
    assert_eq!(deny(forged, Some("acme")).await, Denied::Signature);
    // `alg: none`, and HS256 "signed" with the provider's public key: refused before any check.
    let none = format!(
        "{}.",
        hs256_with(json!({"alg": "none", "kid": "rsa-a"}), &standard("ann"), b"").rsplit_once('.').unwrap().0
    );
    assert_eq!(deny(none, Some("acme")).await, Denied::Algorithm("none".into()));
    let confused = hs256_with(json!({"alg": "HS256", "kid": "rsa-a"}), &standard("ann"), &fixture("rsa-a.pub.pem"));
    assert_eq!(deny(confused, Some("acme")).await, Denied::Algorithm("HS256".into()));
    // An RS256 header on the EC key.
    let mismatched = {
        let key = EncodingKey::from_rsa_pem(&fixture("rsa-a.pem")).unwrap();
        jsonwebtoken::encode(
            &Header { kid: Some("ec-1".into()), ..Header::new(Algorithm::RS256) },
            &standard("ann"),
            &key,
        )
        .unwrap()
    };
    assert!(matches!(deny(mismatched, Some("acme")).await, Denied::Algorithm(_)));
    // The deployment's shared secret admits no one to a tenant with its own identity.
    let shared =
        hs256_with(json!({"alg": "HS256"}), &json!({"tenant": "acme", "sub": "ann", "exp": NOW + 600}), SHARED);
    assert_eq!(deny(shared, Some("acme")).await, Denied::Algorithm("HS256".into()));
    // A provider token naming another tenant is that tenant's to check: acme's key admits no
    // one to globex (which has no identity: the shared secret only).
    let mut elsewhere = standard("ann");
    elsewhere["tenant"] = json!("globex");
    assert_eq!(deny(idp_token("rsa-a", elsewhere.clone()), Some("acme")).await, Denied::Claim("tenant"));
    assert_eq!(deny(idp_token("rsa-a", elsewhere), None).await, Denied::Algorithm("RS256".into()));
}

#[tokio::test]
async fn a_tenants_own_secret_admits_its_users_and_nobody_elses() {
    let (_idp, _, verifier) = with_idp(&["rsa-a"]).await;
    let beta_secret = b"beta's-own-secret-of-32-bytes-or-more";
    let token = |tenant: &str, secret: &[u8]| {
        hs256_with(json!({"alg": "HS256"}), &json!({"tenant": tenant, "sub": "bo", "exp": NOW + 600}), secret)
    };
    let claims = verifier.verify_connect(&token("beta", beta_secret), None, NOW).await.unwrap();
    assert_eq!((claims.tenant.as_str(), claims.sub.as_str()), ("beta", "bo"));
    // The shared secret no longer admits anyone to beta; beta's secret admits no one elsewhere.
    assert_eq!(verifier.verify_connect(&token("beta", SHARED), None, NOW).await, Err(Denied::Signature));
    assert_eq!(verifier.verify_connect(&token("gamma", beta_secret), None, NOW).await, Err(Denied::Signature));
    assert!(verifier.verify_connect(&token("acme", beta_secret), None, NOW).await.is_err());
    // A tenant without an identity of its own: the shared secret, as before.
    assert!(verifier.verify_connect(&token("gamma", SHARED), None, NOW).await.is_ok());
}

#[tokio::test]
async fn revoked_tokens_users_and_tenants_are_refused() {
    let (_idp, store, verifier) = with_idp(&["rsa-a"]).await;
    let mut jti = standard("ann");
    jti["jti"] = json!("t-9");
    let (by_id, ann, bob) =
        (idp_token("rsa-a", jti), idp_token("rsa-a", standard("ann")), idp_token("rsa-a", standard("bob")));
    for token in [&by_id, &ann, &bob] {
        assert!(verifier.verify_connect(token, Some("acme"), NOW).await.is_ok());
    }
    let mut acme = store.tenant_identity("acme").await.unwrap().unwrap();
    acme.revoke_id("t-9", NOW + 600, NOW);
    store.put_tenant_identity(&acme).await.unwrap();
    verifier.forget("acme");
    assert_eq!(verifier.verify_connect(&by_id, Some("acme"), NOW).await, Err(Denied::Revoked));
    assert!(verifier.verify_connect(&ann, Some("acme"), NOW).await.is_ok(), "only that token");
    acme.users_revoked_before.insert("ann".into(), NOW);
    store.put_tenant_identity(&acme).await.unwrap();
    verifier.forget("acme");
    assert_eq!(verifier.verify_connect(&ann, Some("acme"), NOW).await, Err(Denied::Revoked));
    assert!(verifier.verify_connect(&bob, Some("acme"), NOW).await.is_ok(), "only that user");
    let mut fresh = standard("ann");
    fresh["iat"] = json!(NOW + 1);
    assert!(verifier.verify_connect(&idp_token("rsa-a", fresh), Some("acme"), NOW + 2).await.is_ok(), "a new token");
    acme.revoked_before = Some(NOW);
    store.put_tenant_identity(&acme).await.unwrap();
    verifier.forget("acme");
    assert_eq!(verifier.verify_connect(&bob, Some("acme"), NOW).await, Err(Denied::Revoked), "the whole tenant");
}

#[tokio::test]
async fn a_key_rotation_is_picked_up_and_the_retired_key_refused() {
    let (idp, _, verifier) = with_idp(&["rsa-a"]).await;
    assert!(verifier.verify_connect(&idp_token("rsa-a", standard("ann")), Some("acme"), NOW).await.is_ok());
    idp.serve(&["rsa-b"]);
    // The new kid is not in the kept JWKS: it is fetched again, and found.
    assert!(verifier.verify_connect(&idp_token("rsa-b", standard("ann")), Some("acme"), NOW).await.is_ok());
    assert_eq!(*idp.fetches.lock().unwrap(), 2);
    assert_eq!(
        verifier.verify_connect(&idp_token("rsa-a", standard("ann")), Some("acme"), NOW).await,
        Err(Denied::UnknownKey("rsa-a".into())),
        "the retired key"
    );
}

/// The local stack takes the same tokens: `roomcast dev` with a tenant's JWKS set in its table
/// admits an identity provider's token (`?tenant=`) over a real WebSocket, and refuses a token
/// signed with the dev secret for that tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roomcast_dev_admits_an_identity_providers_token() {
    use roomcast_tests::ws;
    let idp = jwks(&["ec-1"]).await;
    let stack = ws::dev("memory", |_| {}).await;
    let mut acme = TenantIdentity::new("acme");
    acme.jwks_url = Some(idp.url.clone());
    acme.issuer = Some(ISSUER.into());
    acme.audience = Some("roomcast".into());
    stack.store.put_tenant_identity(&acme).await.unwrap();
    let now = chrono::Utc::now().timestamp();
    let token =
        idp_token("ec-1", json!({"iss": ISSUER, "aud": "roomcast", "sub": "ann", "exp": now + 600, "iat": now}));
    let mut client = ws::try_connect(&stack, &format!("token={token}&tenant=acme&rooms=general"))
        .await
        .unwrap_or_else(|status| panic!("refused with {status}"));
    let welcome = client.expect_action("welcome").await;
    assert_eq!((welcome["tenant"].as_str(), welcome["user_id"].as_str()), (Some("acme"), Some("ann")));
    let dev_token = ws::token("acme", "ann");
    assert_eq!(ws::try_connect(&stack, &format!("token={dev_token}&rooms=general")).await.err(), Some(403));
    stack.shutdown().await;
}

/// An identity provider that is down, or a flood of unknown `kid`s, costs one fetch per 30 s,
/// not one per connect; with no keys ever fetched, connects fail as unavailable (never admitted).
#[tokio::test]
async fn a_provider_down_or_junk_kids_cost_one_fetch_per_interval() {
    let (idp, store, _) = with_idp(&["rsa-a"]).await;
    let verifier = Verifier::new(SHARED.to_vec(), Some(store.clone())); // 30 s between fetches
    assert!(verifier.verify_connect(&idp_token("rsa-a", standard("ann")), Some("acme"), NOW).await.is_ok());
    for i in 0..5 {
        let junk = {
            let key = EncodingKey::from_rsa_pem(&fixture("rsa-a.pem")).unwrap();
            let header = Header { kid: Some(format!("junk-{i}")), ..Header::new(Algorithm::RS256) };
            jsonwebtoken::encode(&header, &standard("ann"), &key).unwrap()
        };
        assert!(matches!(verifier.verify_connect(&junk, Some("acme"), NOW).await, Err(Denied::UnknownKey(_))));
    }
    assert_eq!(*idp.fetches.lock().unwrap(), 1, "junk kids within 30 s fetch nothing");
    // A tenant whose provider answers nothing: unavailable, and tried once in the interval.
    let mut down = TenantIdentity::new("down");
    down.jwks_url = Some("http://127.0.0.1:9/jwks.json".into());
    down.issuer = Some(ISSUER.into());
    down.audience = Some("roomcast".into());
    store.put_tenant_identity(&down).await.unwrap();
    for _ in 0..3 {
        let answer = verifier.verify_connect(&idp_token("rsa-a", standard("ann")), Some("down"), NOW).await;
        assert!(matches!(answer, Err(Denied::Unavailable(_))), "{answer:?}");
    }
    // Settings that would let the keys be swapped on the way, or tell tenants apart by nothing.
    let mut plain = down.clone();
    plain.jwks_url = Some("http://idp.example.com/jwks.json".into());
    assert!(plain.check().unwrap_err().contains("not https"));
    let mut no_audience = down.clone();
    no_audience.audience = None;
    assert!(no_audience.check().unwrap_err().contains("audience"));
}
