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
    let lower = body.to_lowercase();
    if let Some(word) = lower.split(|c: char| !c.is_alphanumeric()).find(|w| BANNED.contains(w)) {
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

#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments, reason = "in the code wit-bindgen generates")]
mod component {
    wit_bindgen::generate!({ world: "tenant-plugin", path: "../../wit" });

    use roomcast::plugin::host::{Level, log};

    struct Moderation;

    impl Guest for Moderation {
        fn validate(message: Message) -> Verdict {
            match super::moderate(&message.body) {
                super::Verdict::Accept => Verdict::Accept,
                super::Verdict::Rewrite(text) => Verdict::Rewrite(text),
                super::Verdict::Reject(why) => {
                    log(Level::Info, &format!("rejected {}: {why}", message.id));
                    Verdict::Reject(why)
                }
            }
        }

        fn route(_: Message) -> Routing {
            Routing { extra_rooms: Vec::new(), only_users: None, echo_to_sender: true }
        }

        fn welcome(_: WelcomeInfo) -> Option<String> {
            None
        }
    }

    export!(Moderation);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banned_words_are_rejected_whole_words_any_case() {
        assert!(matches!(moderate("buy SPAM now"), Verdict::Reject(r) if r.contains("spam")));
        assert_eq!(moderate("spammer is a fine word"), Verdict::Accept);
    }

    #[test]
    fn whitespace_is_trimmed_and_length_is_limited() {
        assert_eq!(moderate("  hello  "), Verdict::Rewrite("hello".into()));
        assert_eq!(moderate("hello"), Verdict::Accept);
        assert!(matches!(moderate(&"x".repeat(MAX_CHARS + 1)), Verdict::Reject(_)));
        assert!(matches!(moderate("   "), Verdict::Reject(_)));
    }
}
