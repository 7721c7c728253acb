//! A branded welcome: greets the user by name and lists their rooms.

pub fn greeting(tenant: &str, user: &str, rooms: &[String]) -> String {
    let rooms = if rooms.is_empty() {
        "no rooms yet".to_string()
    } else {
        rooms.iter().map(|r| format!("#{r}")).collect::<Vec<_>>().join(", ")
    };
    format!("Welcome to {tenant}, {user}! You are in {rooms}.")
}

/// The plugin: [`greeting`] for every welcome; messages pass as they are.
pub struct Welcome;

impl roomcast_plugin_sdk::Plugin for Welcome {
    const WELCOMES: bool = true;

    fn welcome(info: &roomcast_plugin_sdk::WelcomeInfo) -> Option<String> {
        Some(greeting(&info.tenant, &info.user_id, &info.rooms))
    }
}

roomcast_plugin_sdk::export!(Welcome);

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
