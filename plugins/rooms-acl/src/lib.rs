//! Rooms ACL: who may join which room, from the tenant's configuration — change it with
//! `roomcast plugin config set`, no re-upload:
//!
//! | key | value | meaning |
//! |-----|-------|---------|
//! | `room.NAME` | `ann,bob` | only these users may join room `NAME` |
//! | `room.NAME` | `*` | anyone may join room `NAME` |
//! | `default` | `deny` | rooms without a `room.` key are closed (otherwise open) |
//!
//! A token whose `role` claim is `admin` may join any room.

use roomcast_plugin_sdk::{Join, JoinRequest, Level, Plugin, config, log};

pub struct RoomsAcl;

impl Plugin for RoomsAcl {
    const AUTHORIZES_JOINS: bool = true;

    fn authorize_join(request: &JoinRequest) -> Join {
        if request.claim("role") == Some("admin") {
            return Join::Allow;
        }
        let decision = match config(&format!("room.{}", request.room)) {
            Some(users) if users.split(',').map(str::trim).any(|u| u == "*" || u == request.user_id) => Join::Allow,
            Some(_) => Join::Deny(format!("{} is not on the list of room {}", request.user_id, request.room)),
            None if config("default").as_deref() == Some("deny") => {
                Join::Deny(format!("room {} is closed", request.room))
            }
            None => Join::Allow,
        };
        if let Join::Deny(why) = &decision {
            log(Level::Info, &format!("denied {} in {}: {why}", request.user_id, request.room));
        }
        decision
    }
}

roomcast_plugin_sdk::export!(RoomsAcl);

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_plugin_sdk::testing;

    #[test]
    fn listed_users_join_others_are_denied_and_admins_join_anywhere() {
        testing::set_config([("room.vip", "ann, bob"), ("room.lobby", "*")]);
        assert_eq!(RoomsAcl::authorize_join(&JoinRequest::new("vip", "ann")), Join::Allow);
        assert!(
            matches!(RoomsAcl::authorize_join(&JoinRequest::new("vip", "eve")), Join::Deny(why) if why.contains("eve"))
        );
        assert_eq!(RoomsAcl::authorize_join(&JoinRequest::new("lobby", "eve")), Join::Allow);
        let admin = JoinRequest { claims: vec![("role".into(), "admin".into())], ..JoinRequest::new("vip", "eve") };
        assert_eq!(RoomsAcl::authorize_join(&admin), Join::Allow);
        assert_eq!(testing::take_log().len(), 1);
    }

    #[test]
    fn unlisted_rooms_are_open_unless_the_default_is_deny() {
        testing::set_config([]);
        assert_eq!(RoomsAcl::authorize_join(&JoinRequest::new("anything", "eve")), Join::Allow);
        testing::set_config([("default", "deny")]);
        assert!(matches!(RoomsAcl::authorize_join(&JoinRequest::new("anything", "eve")), Join::Deny(_)));
    }
}
