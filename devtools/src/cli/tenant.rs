//! `roomcast tenant …`: a tenant's settings, its identity (its own token keys) and revocations,
//! against a table or a running `roomcast dev`.

use super::TenantCommand;

/// `roomcast tenant …`.
pub(super) async fn run(command: TenantCommand) -> anyhow::Result<()> {
    match command {
        TenantCommand::Show { tenant, target } => {
            let settings = target.target().await.settings(&tenant).await?;
            println!("{}", serde_json::to_string_pretty(&shown(settings))?);
            Ok(())
        }
        TenantCommand::Set {
            tenant,
            presence_announce_max_users,
            limits,
            latest_on_join,
            no_latest_on_join,
            webhook_url,
            webhook_secret_env,
            webhook_events,
            no_webhook,
            target,
        } => {
            // What is given changes; every other setting stays as it was.
            crate::model::Name::parse("tenant", &tenant).map_err(anyhow::Error::msg)?;
            let target = target.target().await;
            let mut settings = target.settings(&tenant).await?;
            if presence_announce_max_users.is_some() {
                settings.presence_announce_max_users = presence_announce_max_users;
            }
            settings.rate_limits.extend(limits);
            if no_latest_on_join {
                settings.latest_on_join.clear();
            }
            for pattern in latest_on_join {
                if !settings.latest_on_join.contains(&pattern) {
                    settings.latest_on_join.push(pattern);
                }
            }
            anyhow::ensure!(
                settings.latest_on_join.len() <= crate::model::TenantSettings::MAX_LATEST_ON_JOIN,
                "at most {} patterns of rooms that keep their latest message",
                crate::model::TenantSettings::MAX_LATEST_ON_JOIN
            );
            settings.webhook =
                webhook(settings.webhook.take(), webhook_url, webhook_secret_env, webhook_events, no_webhook)?;
            target.set_settings(&settings).await?;
            // A deployed stack's webhook function posts to public addresses only.
            if let (Some(webhook), super::plugins::Target::Table(_)) = (&settings.webhook, &target)
                && let Err(why) = crate::webhook::guard::check_url(&webhook.url, false)
            {
                eprintln!("note: {why}; the deployed webhook function will refuse to deliver there");
            }
            println!("{}", serde_json::to_string_pretty(&shown(settings))?);
            Ok(())
        }
        TenantCommand::Identity { tenant, jwks_url, issuer, audience, hs256_secret_env, clear, target } => {
            let target = target.target().await;
            let mut identity = target.identity(&tenant).await?;
            if clear {
                identity.hs256_secret = None;
                identity.jwks_url = None;
                identity.issuer = None;
                identity.audience = None;
            }
            if let Some(url) = jwks_url {
                identity.jwks_url = Some(url);
                identity.hs256_secret = None;
            }
            if let Some(var) = hs256_secret_env {
                let secret = std::env::var(&var).map_err(|_| anyhow::anyhow!("{var} is not set"))?;
                identity.hs256_secret = Some(secret);
                identity.jwks_url = None;
            }
            if issuer.is_some() {
                identity.issuer = issuer;
            }
            if audience.is_some() {
                identity.audience = audience;
            }
            target.set_identity(&identity).await?;
            identity.hs256_secret = identity.hs256_secret.map(|_| "(set)".into());
            println!("{}", serde_json::to_string_pretty(&identity)?);
            Ok(())
        }
        TenantCommand::Revoke { tenant, token_id, until, user, all, target } => {
            anyhow::ensure!(
                token_id.is_some() || user.is_some() || all,
                "name what to revoke: --token-id, --user or --all"
            );
            let target = target.target().await;
            let mut identity = target.identity(&tenant).await?;
            anyhow::ensure!(
                identity.hs256_secret.is_some() || identity.jwks_url.is_some(),
                "{tenant} has no identity of its own: its tokens are the deployment's (rotate the shared secret, \
                 or give it one with `roomcast tenant identity`)"
            );
            let now = chrono::Utc::now().timestamp();
            if let (Some(id), Some(until)) = (&token_id, until) {
                identity.revoke_id(id, until, now);
            }
            if let Some(user) = &user {
                identity.users_revoked_before.insert(user.clone(), now);
            }
            if all {
                identity.revoked_before = Some(now);
            }
            target.set_identity(&identity).await?;
            println!("revoked; authorizers apply it within 30 s");
            Ok(())
        }
    }
}

/// Settings as printed: a webhook's secret left out.
fn shown(mut settings: crate::model::TenantSettings) -> crate::model::TenantSettings {
    if let Some(webhook) = settings.webhook.as_mut() {
        webhook.secret = "(set)".into();
    }
    settings
}

/// The tenant's webhook after `roomcast tenant set`'s webhook options.
fn webhook(
    current: Option<crate::model::WebhookSettings>,
    url: Option<String>,
    secret_env: Option<String>,
    events: Vec<String>,
    remove: bool,
) -> anyhow::Result<Option<crate::model::WebhookSettings>> {
    if remove {
        return Ok(None);
    }
    if url.is_none() && secret_env.is_none() && events.is_empty() {
        return Ok(current);
    }
    let secret = match &secret_env {
        Some(var) => Some(std::env::var(var).map_err(|_| anyhow::anyhow!("{var} is not set"))?),
        None => None,
    };
    let webhook = match current {
        Some(mut webhook) => {
            webhook.url = url.unwrap_or(webhook.url);
            webhook.secret = secret.unwrap_or(webhook.secret);
            if !events.is_empty() {
                webhook.events = events;
            }
            webhook
        }
        None => crate::model::WebhookSettings {
            url: url.ok_or_else(|| anyhow::anyhow!("a new webhook needs --webhook-url"))?,
            secret: secret.ok_or_else(|| anyhow::anyhow!("a new webhook needs --webhook-secret-env"))?,
            events,
        },
    };
    // Through `--dev` the secret is never given out: an empty one keeps the stored.
    let mut checked = webhook.clone();
    if checked.secret.is_empty() {
        checked.secret = "kept".repeat(4);
    }
    crate::webhook::check(&checked).map_err(anyhow::Error::msg)?;
    Ok(Some(webhook))
}
