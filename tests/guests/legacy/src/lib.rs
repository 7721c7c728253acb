//! A plugin written against `roomcast:plugin@0.1.0` (`wit/0.1.0/`), as the moderation example
//! was before 0.2.0: `validate` rejects "spam" and trims whitespace, `route` sends a message
//! starting with `@user` only to that user and the sender, `welcome` greets. The host must keep
//! loading it and calling its hooks as 0.1.0 defines them.

#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments, reason = "in the code wit-bindgen generates")]
mod component {
    wit_bindgen::generate!({ world: "tenant-plugin", path: "../../../wit/0.1.0/roomcast-plugin.wit" });

    use roomcast::plugin::host::{Level, log};

    struct Legacy;

    impl Guest for Legacy {
        fn validate(message: Message) -> Verdict {
            if message.body.to_lowercase().split_whitespace().any(|w| w == "spam") {
                log(Level::Info, &format!("rejected {}", message.id));
                return Verdict::Reject("the word \"spam\" is not allowed here (0.1.0)".into());
            }
            let trimmed = message.body.trim();
            if trimmed.len() != message.body.len() { Verdict::Rewrite(trimmed.into()) } else { Verdict::Accept }
        }

        fn route(message: Message) -> Routing {
            let only_users = message.body.strip_prefix('@').map(|rest| {
                let user: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                vec![user, message.user_id.clone()]
            });
            Routing { extra_rooms: Vec::new(), only_users, echo_to_sender: true }
        }

        fn welcome(info: WelcomeInfo) -> Option<String> {
            Some(format!("hello {} (0.1.0)", info.user_id))
        }
    }

    export!(Legacy);
}
