//! Moderation: banned words are rejected, overlong messages are rejected, surrounding
//! whitespace is trimmed (a rewrite). Everything else is accepted as it is.

pub const BANNED: &[&str] = &["spam", "scam", "viagra"];
pub const MAX_CHARS: usize = 500;

/// The decision, in plain Rust (the component adapts it to the WIT `verdict`).
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Rewrite(String),
    Reject(String),
}

pub fn moderate(body: &str) -> Verdict {
    moderate_with(body, BANNED)
}

/// [`moderate`] with another list of banned words (lower case).
pub fn moderate_with(body: &str, banned: &[&str]) -> Verdict {
    let lower = body.to_lowercase();
    if let Some(word) = lower.split(|c: char| !c.is_alphanumeric()).find(|w| banned.contains(w)) {
        return Verdict::Reject(format!("the word {word:?} is not allowed here"));
    }
    let trimmed = body.trim();
    if trimmed.chars().count() > MAX_CHARS {
        return Verdict::Reject(format!("messages are limited to {MAX_CHARS} characters"));
    }
    if trimmed.is_empty() {
        return Verdict::Reject("empty message".into());
    }
    if trimmed.len() != body.len() {
        return Verdict::Rewrite(trimmed.to_string());
    }
    Verdict::Accept
}

/// The plugin: [`moderate`] with the banned words from the tenant's configuration (`banned`,
/// comma-separated: `roomcast plugin config set --tenant T banned=spam,scam`), or [`BANNED`].
pub struct Moderation;

impl roomcast_plugin_sdk::Plugin for Moderation {
    fn on_message(message: &roomcast_plugin_sdk::Message) -> roomcast_plugin_sdk::Outcome {
        use roomcast_plugin_sdk::{Level, Outcome, config, log};
        let configured = config("banned");
        let banned: Vec<&str> = match &configured {
            Some(words) => words.split(',').map(str::trim).filter(|w| !w.is_empty()).collect(),
            None => BANNED.to_vec(),
        };
        match moderate_with(&message.body, &banned) {
            Verdict::Accept => Outcome::accept(),
            Verdict::Rewrite(text) => Outcome::rewrite(text),
            Verdict::Reject(why) => {
                log(Level::Info, &format!("rejected {}: {why}", message.id));
                Outcome::reject(why)
            }
        }
    }
}

roomcast_plugin_sdk::export!(Moderation);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_words_are_rejected_whole_words_any_case() {
        assert!(matches!(moderate("buy SPAM now"), Verdict::Reject(r) if r.contains("spam")));
        assert_eq!(moderate("spammer is a fine word"), Verdict::Accept);
    }

    #[test]
    fn the_banned_words_come_from_the_tenants_configuration() {
        use roomcast_plugin_sdk::{Message, Outcome, Plugin, testing};
        testing::set_config([("banned", "durian, natto")]);
        let reject = Moderation::on_message(&Message::new("general", "ann", "I love natto"));
        assert!(matches!(reject.verdict, roomcast_plugin_sdk::Verdict::Reject(ref why) if why.contains("natto")));
        assert_eq!(Moderation::on_message(&Message::new("general", "ann", "spam")), Outcome::accept());
        assert_eq!(testing::take_log().len(), 1);
        testing::set_config([]);
        assert!(matches!(
            Moderation::on_message(&Message::new("g", "ann", "spam")).verdict,
            roomcast_plugin_sdk::Verdict::Reject(_)
        ));
    }

    #[test]
    fn whitespace_is_trimmed_and_length_is_limited() {
        assert_eq!(moderate("  hello  "), Verdict::Rewrite("hello".into()));
        assert_eq!(moderate("hello"), Verdict::Accept);
        assert!(matches!(moderate(&"x".repeat(MAX_CHARS + 1)), Verdict::Reject(_)));
        assert!(matches!(moderate("   "), Verdict::Reject(_)));
    }
}
