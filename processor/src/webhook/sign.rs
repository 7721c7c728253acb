//! The signature on every webhook delivery: `Roomcast-Signature: t=<unix seconds>,v1=<hex>`,
//! where `v1` is HMAC-SHA256, keyed with the tenant's webhook secret, over `"<t>.<body>"` (the
//! body as sent, byte for byte). A receiver recomputes it, compares in constant time, and refuses
//! a `t` more than five minutes from its own clock (a replayed delivery).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// The header's name.
pub const HEADER: &str = "Roomcast-Signature";

/// How far a receiver should let `t` be from its clock.
pub const TOLERANCE_SECONDS: i64 = 300;

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The header's value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, timestamp, body).finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// What a receiver checks: the header verifies `body` with `secret`, and its time is within
/// [`TOLERANCE_SECONDS`] of `now`.
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64) -> Result<(), String> {
    let mut timestamp = None;
    let mut given = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => given = Some(v.to_string()),
            _ => {}
        }
    }
    let (Some(timestamp), Some(given)) = (timestamp, given) else {
        return Err(format!("{HEADER} must be t=<seconds>,v1=<hex>"));
    };
    if (now - timestamp).abs() > TOLERANCE_SECONDS {
        return Err(format!("the signature's time {timestamp} is more than {TOLERANCE_SECONDS} s from now"));
    }
    let bytes: Option<Vec<u8>> =
        (0..given.len()).step_by(2).map(|i| given.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    let bytes = bytes.ok_or("v1 is not hex")?;
    mac(secret, timestamp, body).verify_slice(&bytes).map_err(|_| "the signature does not match".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_the_body_secret_and_time_it_was_made_for() {
        let body = br#"{"events":[]}"#;
        let header = signature("s3cret", 1_800_000_000, body);
        assert!(header.starts_with("t=1800000000,v1="), "{header}");
        assert_eq!(verify("s3cret", &header, body, 1_800_000_100), Ok(()));
        assert!(verify("other", &header, body, 1_800_000_100).is_err());
        assert!(verify("s3cret", &header, br#"{"events":[1]}"#, 1_800_000_100).is_err());
        assert!(verify("s3cret", &header, body, 1_800_000_000 + TOLERANCE_SECONDS + 1).is_err());
        assert!(verify("s3cret", "v1=00", body, 1_800_000_000).is_err());
    }
}
