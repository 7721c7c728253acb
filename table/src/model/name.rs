//! Validated tenant and room names: never a `#` inside a key component.

use super::*;

/// The longest user id (a token's `sub`) a record may carry, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;

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
