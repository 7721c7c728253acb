//! `roomcast publish`: a backend's message into a room, through a running `roomcast dev`, a
//! deployed stack's endpoint (SigV4-signed for the function URL, or a tenant's publish token),
//! or straight into a table.

use std::sync::Arc;
use std::time::Duration;

use super::{PublishArgs, config, table_store};

/// `roomcast publish`.
pub(super) async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let PublishArgs { tenant, room, message, user_id, idempotency_key, jwt_secret, endpoint, token, target } = args;

    let body = serde_json::json!({
        "tenant": tenant, "room": room, "message": message,
        "user_id": user_id, "idempotency_key": idempotency_key,
    });
    let id = match (&endpoint, &target.dev) {
        (Some(endpoint), _) => publish_to_endpoint(endpoint, token.as_deref(), serde_json::to_vec(&body)?).await?,
        (None, Some(url)) => {
            let exp = chrono::Utc::now().timestamp() + 300;
            let claims = crate::auth::Claims {
                tenant: tenant.clone(),
                sub: "roomcast-cli".into(),
                exp,
                nbf: None,
                scope: Some("publish".into()),
                rooms: None,
                extra: Default::default(),
            };
            let token = crate::auth::mint(&claims, jwt_secret.as_bytes());
            let answer = crate::dev::api::request_as(
                url,
                http::Method::POST,
                "/publish",
                serde_json::to_vec(&body)?,
                Some(&token),
            )
            .await?;
            answer["id"].as_str().unwrap_or_default().to_string()
        }
        (None, None) => {
            let deps = crate::publish::PublishDeps {
                store: Arc::new(table_store(&target.table).await),
                clock: Arc::new(crate::model::SystemClock),
                history_ttl_seconds: std::env::var("HISTORY_TTL_SECONDS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(7 * 86_400),
                idempotency_window_seconds: crate::handlers::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
                // The operator's publish: no tenant limit applies.
                limits: Default::default(),
            };
            crate::publish::publish(&deps, &crate::publish::Caller::Operator, &serde_json::to_vec(&body)?)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
        }
    };
    println!("published {id} into {tenant}/{room}");
    Ok(())
}

/// POSTs a publish to a deployed endpoint over HTTPS: with a tenant's bearer token, or signed
/// with SigV4 (service `lambda`) for the IAM-authorized function URL. Answers the message id.
async fn publish_to_endpoint(endpoint: &str, token: Option<&str>, body: Vec<u8>) -> anyhow::Result<String> {
    use aws_credential_types::provider::ProvideCredentials;
    use http_body_util::BodyExt;
    let uri: http::Uri = endpoint.parse().map_err(|e| anyhow::anyhow!("--endpoint {endpoint:?}: {e}"))?;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(&uri)
        .header("content-type", "application/json")
        .header("host", uri.authority().map(|a| a.as_str()).unwrap_or_default())
        .body(body.clone())?;
    match token {
        Some(token) => {
            let value = format!("Bearer {}", token.trim_start_matches("Bearer "));
            request.headers_mut().insert("authorization", value.parse()?);
        }
        None => {
            let sdk = config::load_aws().await;
            let credentials = sdk
                .credentials_provider()
                .ok_or_else(|| anyhow::anyhow!("no AWS credentials to sign the request with (or pass --token)"))?
                .provide_credentials()
                .await?;
            // A function URL names its region (`{id}.lambda-url.{region}.on.aws`); else the SDK's.
            let host = uri.host().unwrap_or_default();
            let region = host
                .split('.')
                .skip_while(|part| *part != "lambda-url")
                .nth(1)
                .map(str::to_string)
                .or_else(|| sdk.region().map(|r| r.to_string()))
                .unwrap_or_else(|| "us-east-1".into());
            let identity = aws_smithy_runtime_api::client::identity::Identity::from(credentials);
            let params = aws_sigv4::sign::v4::SigningParams::builder()
                .identity(&identity)
                .region(&region)
                .name("lambda")
                .time(std::time::SystemTime::now())
                .settings(aws_sigv4::http_request::SigningSettings::default())
                .build()?
                .into();
            let headers: Vec<(String, String)> = request
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect();
            let signable = aws_sigv4::http_request::SignableRequest::new(
                "POST",
                endpoint,
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                aws_sigv4::http_request::SignableBody::Bytes(&body),
            )?;
            let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)?.into_parts();
            instructions.apply_to_request_http1x(&mut request);
        }
    }
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_native_roots()?.https_or_http().enable_http1().build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(https);
    let (parts, body) = request.into_parts();
    let request = http::Request::from_parts(parts, http_body_util::Full::new(bytes::Bytes::from(body)));
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("{endpoint}: no answer within 30 s"))??;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{endpoint} answered {status}: {}",
            answer["error"].as_str().unwrap_or(&String::from_utf8_lossy(&bytes))
        );
    }
    answer["id"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("{endpoint} answered without an id"))
}
