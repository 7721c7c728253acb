//! `roomcast plugin new NAME`: a ready plugin crate on the guest SDK.

use std::path::{Path, PathBuf};

/// Writes the crate `NAME/` in `dir` and returns its path. Refuses to write over anything.
pub fn new_plugin(name: &str, dir: &Path, sdk_path: Option<&Path>) -> anyhow::Result<PathBuf> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !fine {
        anyhow::bail!("{name:?}: a plugin name is 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter");
    }
    let root = dir.join(name);
    if root.exists() {
        anyhow::bail!("{} exists already", root.display());
    }
    // Without --sdk-path: the SDK of the checkout this `roomcast` was built from, when it is
    // still there (the SDK is not on crates.io yet), else its crates.io version.
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk");
    let sdk_path = sdk_path.or_else(|| built_from.join("Cargo.toml").exists().then_some(built_from.as_path()));
    let sdk = match sdk_path {
        Some(path) => {
            let path = std::fs::canonicalize(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            format!("{{ path = {:?} }}", path.display().to_string())
        }
        None => format!("\"{}\"", SDK_VERSION),
    };
    let type_name: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect();
    let files = [
        ("Cargo.toml", CARGO.replace("{name}", name).replace("{sdk}", &sdk)),
        ("src/lib.rs", LIB.replace("{Type}", &type_name)),
        ("README.md", README.replace("{name}", name).replace("{crate}", &name.replace('-', "_"))),
        ("events/message.json", EVENT.to_string()),
        ("config.json", "{\"banned\": \"spam\"}\n".to_string()),
    ];
    for (file, text) in files {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| anyhow::anyhow!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(root)
}

/// The SDK version a new crate depends on.
const SDK_VERSION: &str = "0.2";

const CARGO: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
# cdylib: the component; rlib: `cargo test` on the plugin's logic.
crate-type = ["cdylib", "rlib"]

[dependencies]
roomcast-plugin-sdk = {sdk}

# A crate of its own, not a member of any workspace around it.
[workspace]
"#;

const LIB: &str = r#"//! A Roomcast tenant plugin (roomcast:plugin@0.2.0).

use roomcast_plugin_sdk::{Join, JoinRequest, Level, Message, Outcome, Plugin, config, log};

pub struct {Type};

impl Plugin for {Type} {
    /// `true`: the host calls `authorize_join` for every join of the tenant's rooms.
    const AUTHORIZES_JOINS: bool = false;

    fn on_message(message: &Message) -> Outcome {
        // Configuration without recompiling: `roomcast plugin config set --tenant T banned=spam`.
        let banned = config("banned").unwrap_or_default();
        if banned.split(',').map(str::trim).any(|w| !w.is_empty() && message.body.contains(w)) {
            log(Level::Info, &format!("rejected {}", message.id));
            return Outcome::reject("that word is not allowed here");
        }
        Outcome::accept()
    }

    fn authorize_join(request: &JoinRequest) -> Join {
        let _ = request;
        Join::Allow
    }
}

roomcast_plugin_sdk::export!({Type});

#[cfg(test)]
mod tests {
    use super::*;
    use roomcast_plugin_sdk::testing;

    #[test]
    fn configured_words_are_rejected() {
        testing::set_config([("banned", "spam")]);
        assert!(matches!({Type}::on_message(&Message::new("general", "ann", "buy spam")).verdict,
            roomcast_plugin_sdk::Verdict::Reject(_)));
        assert_eq!({Type}::on_message(&Message::new("general", "ann", "hello")), Outcome::accept());
    }
}
"#;

const README: &str = r#"# {name}

A Roomcast tenant plugin.

    cargo test                                            # the plugin's logic, natively
    cargo build --release --target wasm32-wasip2          # the component
    roomcast plugin test target/wasm32-wasip2/release/{crate}.wasm --event events/message.json --config config.json
    roomcast plugin upload --tenant T target/wasm32-wasip2/release/{crate}.wasm --dev http://127.0.0.1:8080
    roomcast plugin config set --tenant T banned=spam --dev http://127.0.0.1:8080
"#;

const EVENT: &str = r#"{
  "time": 1767225600000,
  "message": {"id": "m1", "tenant": "acme", "room": "general", "user_id": "ann", "body": "hello", "timestamp": "2026-01-01T00:00:00.000Z"}
}
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn writes_a_crate_and_refuses_bad_names_and_overwrites() {
        let dir = std::env::temp_dir().join(format!("roomcast-new-{}", std::process::id()));
        let root = super::new_plugin("word-filter", &dir, None).unwrap();
        let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
        assert!(lib.contains("pub struct WordFilter;") && lib.contains("export!(WordFilter)"));
        // From a checkout: the SDK next to it, by path.
        assert!(std::fs::read_to_string(root.join("Cargo.toml")).unwrap().contains("plugins/sdk"));
        assert!(root.join("config.json").exists());
        assert!(super::new_plugin("word-filter", &dir, None).is_err(), "overwrote a crate");
        assert!(super::new_plugin("Bad Name", &dir, None).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
