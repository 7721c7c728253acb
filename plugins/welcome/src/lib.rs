//! A branded welcome: greets the user by name and lists their rooms.

pub fn greeting(tenant: &str, user: &str, rooms: &[String]) -> String {
    let rooms = if rooms.is_empty() {
        "no rooms yet".to_string()
    } else {
        rooms.iter().map(|r| format!("#{r}")).collect::<Vec<_>>().join(", ")
    };
    format!("Welcome to {tenant}, {user}! You are in {rooms}.")
}

#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments, reason = "in the code wit-bindgen generates")]
mod component {
    wit_bindgen::generate!({ world: "tenant-plugin", path: "../../wit" });

    struct Welcome;

    impl Guest for Welcome {
        fn validate(_: Message) -> Verdict {
            Verdict::Accept
        }

        fn route(_: Message) -> Routing {
            Routing { extra_rooms: Vec::new(), only_users: None, echo_to_sender: true }
        }

        fn welcome(info: WelcomeInfo) -> Option<String> {
            Some(super::greeting(&info.tenant, &info.user_id, &info.rooms))
        }
    }

    export!(Welcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets_by_name_with_the_rooms() {
        assert_eq!(
            greeting("acme", "ann", &["general".into(), "ops".into()]),
            "Welcome to acme, ann! You are in #general, #ops."
        );
        assert_eq!(greeting("acme", "ann", &[]), "Welcome to acme, ann! You are in no rooms yet.");
    }
}
