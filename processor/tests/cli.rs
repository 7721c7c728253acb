//! The `roomcast` binary's plugin command, run as a user runs it, on components built from this
//! workspace (`scripts/test` builds them for wasm32-wasip2 first).

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn wasm(name: &str) -> PathBuf {
    let path = root().join(format!("target/wasm32-wasip2/release/{name}.wasm"));
    assert!(path.exists(), "{} is missing: run scripts/test (it builds the components)", path.display());
    path
}

fn plugin_test(component: &str, event: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["plugin", "test"])
        .arg(wasm(component))
        .arg("--event")
        .arg(root().join(event))
        .output()
        .expect("run roomcast");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plugin_test_prints_the_verdict_fuel_time_and_log() {
    let (ok, stdout, stderr) = plugin_test("roomcast_plugin_moderation", "plugins/events/spam.json");
    assert!(ok, "{stderr}");
    assert!(stdout.contains(r#"validate  Verdict::Reject("the word \"spam\" is not allowed here")"#), "{stdout}");
    assert!(stdout.contains("fuel ") && stdout.contains(" ms"), "{stdout}");
    assert!(stdout.contains("log  info: rejected"), "{stdout}");
    assert!(!stdout.contains("route"), "a rejected message is not routed: {stdout}");

    let (ok, stdout, _) = plugin_test("roomcast_plugin_welcome", "plugins/events/welcome.json");
    assert!(ok);
    assert!(stdout.contains(r#"Some("Welcome to demo, alice! You are in #general, #ops.")"#), "{stdout}");
}

#[test]
fn plugin_test_reports_faults_and_refused_components_with_a_failing_status() {
    let event = std::env::temp_dir().join(format!("roomcast-loop-{}.json", std::process::id()));
    std::fs::write(
        &event,
        r#"{"message": {"id": "1", "tenant": "t", "room": "r", "user_id": "u", "body": "loop", "timestamp": "x"}}"#,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_roomcast"))
        .args(["plugin", "test"])
        .arg(wasm("roomcast_hostile_plugin"))
        .arg("--event")
        .arg(&event)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAULT ran out of fuel"));

    let (ok, _, stderr) = plugin_test("roomcast_stranger_plugin", "plugins/events/spam.json");
    assert!(!ok);
    assert!(stderr.contains("does not implement roomcast:plugin/tenant-plugin"), "{stderr}");
    let _ = std::fs::remove_file(event);
}
