//! `roomcast publish`: a backend's message into a room, through a running `roomcast dev`, a
//! deployed stack's endpoint (SigV4-signed for the function URL, or a tenant's publish token),
//! or straight into a table.

use std::sync::Arc;
use std::time::Duration;

use super::{PublishArgs, UserDisconnectArgs, UserRoomArgs, UserSendArgs, config, table_store};

/// `roomcast publish`.
pub(super) async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let PublishArgs { tenant, room, message, user_id, idempotency_key, jwt_secret, endpoint, token, target } = args;
    let body = serde_json::json!({
        "tenant": tenant, "room": room, "message": message,
        "user_id": user_id, "idempotency_key": idempotency_key,
    });
    let via = Via { endpoint: endpoint.as_deref(), token: token.as_deref(), jwt_secret: &jwt_secret, target: &target };
    let answer = send(&via, &tenant, &body).await?;
    let id = answer["id"].as_str().ok_or_else(|| anyhow::anyhow!("the answer has no id: {answer}"))?;
    println!("published {id} into {tenant}/{room}");
    Ok(())
}

/// `roomcast user disconnect`.
pub(super) async fn disconnect_user(args: UserDisconnectArgs) -> anyhow::Result<()> {
    let UserDisconnectArgs { tenant, user, refuse_for, via } = args;
    let refuse_until = refuse_for
        .map(|d| chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default())
        .map(|at| crate::model::format_ts(&at));
    let body = serde_json::json!({
        "action": "disconnect_user", "tenant": tenant, "user_id": user, "refuse_until": refuse_until,
    });
    let answer = send(&Via::of(&via), &tenant, &body).await?;
    let closed =
        answer["disconnected"].as_u64().ok_or_else(|| anyhow::anyhow!("the answer says nothing closed: {answer}"))?;
    match answer["refused_until"].as_str() {
        Some(until) => println!("disconnected {closed} connection(s) of {tenant}/{user}; refused until {until}"),
        None => println!("disconnected {closed} connection(s) of {tenant}/{user}"),
    }
    Ok(())
}

/// `roomcast user join` and `roomcast user leave` (`action`: `join_user`, `leave_user`).
pub(super) async fn user_room(action: &str, args: UserRoomArgs) -> anyhow::Result<()> {
    let UserRoomArgs { tenant, user, room, via } = args;
    let body = serde_json::json!({ "action": action, "tenant": tenant, "user_id": user, "room": room });
    let answer = send(&Via::of(&via), &tenant, &body).await?;
    println!("{tenant}/{user} {room}: {answer}");
    Ok(())
}

/// `roomcast user send`.
pub(super) async fn send_to_user(args: UserSendArgs) -> anyhow::Result<()> {
    let UserSendArgs { tenant, user, message, from, via } = args;
    let body = serde_json::json!({
        "action": "send_to_user", "tenant": tenant, "user_id": user, "message": message, "from": from,
    });
    let answer = send(&Via::of(&via), &tenant, &body).await?;
    let connections = answer["connections"].as_u64().unwrap_or_default();
    match answer["id"].as_str() {
        Some(id) => println!("sent {id} to {connections} connection(s) of {tenant}/{user}"),
        None => println!("{tenant}/{user} has no connection: nothing sent"),
    }
    Ok(())
}

/// Where a backend's request goes: a deployed endpoint, a running `roomcast dev`, or a table.
pub(super) struct Via<'a> {
    pub(super) endpoint: Option<&'a str>,
    pub(super) token: Option<&'a str>,
    pub(super) jwt_secret: &'a str,
    pub(super) target: &'a super::PluginTargetArgs,
}

impl<'a> Via<'a> {
    fn of(args: &'a super::BackendArgs) -> Via<'a> {
        Via {
            endpoint: args.endpoint.as_deref(),
            token: args.token.as_deref(),
            jwt_secret: &args.jwt_secret,
            target: &args.target,
        }
    }
}

/// One backend request (a publish, or a user operation when `body` names an `action`), as the
/// publish function takes it; its answer.
pub(super) async fn send(via: &Via<'_>, tenant: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    match (via.endpoint, &via.target.dev) {
        (Some(endpoint), _) => to_endpoint(endpoint, via.token, serde_json::to_vec(body)?).await,
        (None, Some(url)) => {
            let exp = chrono::Utc::now().timestamp() + 300;
            let claims = crate::auth::Claims {
                tenant: tenant.to_string(),
                sub: "roomcast-cli".into(),
                exp,
                nbf: None,
                // Publishing, and acting on users (`roomcast user`).
                scope: Some("publish users".into()),
                rooms: None,
                extra: Default::default(),
            };
            let token = crate::auth::mint(&claims, via.jwt_secret.as_bytes());
            crate::dev::api::request_as(url, http::Method::POST, "/publish", serde_json::to_vec(body)?, Some(&token))
                .await
        }
        (None, None) => {
            let deps = crate::publish::PublishDeps {
                store: Arc::new(table_store(&via.target.table).await),
                clock: Arc::new(crate::model::SystemClock),
                history_ttl_seconds: std::env::var("HISTORY_TTL_SECONDS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(7 * 86_400),
                idempotency_window_seconds: crate::handlers::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
                // The operator's: no tenant limit applies.
                limits: Default::default(),
            };
            // The operator's request, as the publish function's direct invoke takes it.
            let event = serde_json::to_value(body)?;
            let answer = crate::backend::handle(&deps, &event, b"").await.map_err(|e| anyhow::anyhow!(e))?;
            Ok(answer)
        }
    }
}

/// POSTs a backend's request to a deployed endpoint over HTTPS: with a tenant's bearer token, or
/// signed with SigV4 (service `lambda`) for the IAM-authorized function URL. Its JSON answer.
async fn to_endpoint(endpoint: &str, token: Option<&str>, body: Vec<u8>) -> anyhow::Result<serde_json::Value> {
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
    Ok(answer)
}
