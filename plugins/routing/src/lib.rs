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

/// The plugin: [`route`] for every message, accepted as it is.
pub struct RoutingPlugin;

impl roomcast_plugin_sdk::Plugin for RoutingPlugin {
    fn on_message(message: &roomcast_plugin_sdk::Message) -> roomcast_plugin_sdk::Outcome {
        let r = route(&message.room, &message.user_id, &message.body);
        roomcast_plugin_sdk::Outcome::accept().routed(roomcast_plugin_sdk::Routing {
            extra_rooms: r.extra_rooms,
            only_users: r.only_users,
            echo_to_sender: r.echo_to_sender,
        })
    }
}

roomcast_plugin_sdk::export!(RoutingPlugin);

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
