//! Routing: a message in `announcements` also goes to every room named with `#room` in it;
//! a message starting with `@user` goes only to that user (and back to the sender).

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Routing {
    pub extra_rooms: Vec<String>,
    pub only_users: Option<Vec<String>>,
    pub echo_to_sender: bool,
}

pub fn route(room: &str, sender: &str, body: &str) -> Routing {
    let mut routing = Routing { echo_to_sender: true, ..Routing::default() };
    if room == "announcements" {
        for word in body.split_whitespace() {
            if let Some(target) = word.strip_prefix('#') {
                let target = target.trim_end_matches(|c: char| !c.is_alphanumeric());
                if !target.is_empty() && target != room && !routing.extra_rooms.iter().any(|r| r == target) {
                    routing.extra_rooms.push(target.to_string());
                }
            }
        }
    }
    if let Some(mention) = body.strip_prefix('@') {
        let user: String = mention.chars().take_while(|c| !c.is_whitespace()).collect();
        if !user.is_empty() {
            routing.only_users = Some(vec![user, sender.to_string()]);
        }
    }
    routing
}

#[cfg(target_arch = "wasm32")]
#[allow(clippy::too_many_arguments, reason = "in the code wit-bindgen generates")]
mod component {
    wit_bindgen::generate!({ world: "tenant-plugin", path: "../../wit" });

    struct RoutingPlugin;

    impl Guest for RoutingPlugin {
        fn validate(_: Message) -> Verdict {
            Verdict::Accept
        }

        fn route(message: Message) -> Routing {
            let r = super::route(&message.room, &message.user_id, &message.body);
            Routing { extra_rooms: r.extra_rooms, only_users: r.only_users, echo_to_sender: r.echo_to_sender }
        }

        fn welcome(_: WelcomeInfo) -> Option<String> {
            None
        }
    }

    export!(RoutingPlugin);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_fan_out_to_the_rooms_they_name() {
        let r = route("announcements", "ann", "release today in #general and #ops, see #general");
        assert_eq!(r.extra_rooms, ["general", "ops"]);
        assert_eq!(route("general", "ann", "see #ops").extra_rooms, Vec::<String>::new(), "only from announcements");
    }

    #[test]
    fn a_mention_goes_only_to_that_user_and_the_sender() {
        assert_eq!(route("general", "ann", "@bob lunch?").only_users, Some(vec!["bob".into(), "ann".into()]));
        assert_eq!(route("general", "ann", "hi @bob").only_users, None);
    }
}
