//! Validated tenant and room names: never a `#` inside a key component.

use super::*;

/// The longest user id (a token's `sub`) a record may carry, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

/// Whether room-name `patterns` match `room`: a name equal to it, or a prefix ending in `*` that
/// it starts with (`*` alone: every room). The `rooms` claim and a tenant's rooms that keep their
/// latest message ([`TenantSettings::latest_on_join`]) are such patterns.
pub fn room_matches(patterns: &[String], room: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => p == room,
    })
}

/// A room-name pattern as [`room_matches`] reads it: a room name, or a prefix of one followed by
/// `*` (`*` alone included).
pub fn parse_room_pattern(pattern: &str) -> Result<String, String> {
    match pattern.strip_suffix('*') {
        Some("") => Ok(pattern.to_string()),
        Some(prefix) => Name::parse("room pattern", prefix).map(|_| pattern.to_string()),
        None => Name::parse("room pattern", pattern).map(|_| pattern.to_string()),
    }
}

/// A tenant or room name: 1–64 of `A-Z a-z 0-9 _ - . :`. Never contains the key separator `#`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub const MAX_LEN: usize = 64;

    pub fn parse(what: &str, value: &str) -> Result<Name, String> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(format!("{what} must be 1 to {} characters, got {}", Self::MAX_LEN, value.len()));
        }
        if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))) {
            return Err(format!("{what} {value:?} contains {bad:?}; allowed are letters, digits and _ - . :"));
        }
        Ok(Name(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
