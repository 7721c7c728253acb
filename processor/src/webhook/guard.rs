//! Where a webhook may be delivered: a tenant chooses the URL, and the delivering function runs
//! inside the operator's account, so a URL that reaches the function's own network (the instance
//! metadata service at 169.254.169.254, a VPC's private addresses, loopback) would let a tenant
//! make requests there. Unless the deployment allows private addresses
//! (`ROOMCAST_WEBHOOK_ALLOW_PRIVATE`, which `roomcast dev` does for receivers on loopback), a
//! delivery goes only to public addresses:
//!
//! * a URL whose host is an address is checked before any request ([`check_url`]);
//! * a host name is resolved by [`PublicOnly`], the HTTP client's resolver, which drops every
//!   address that is not public: the request connects to an address that was checked, so a name
//!   that resolves differently on a second lookup (DNS rebinding) gains nothing;
//! * redirects are never followed, and no proxy from the environment is used.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Whether `ip` is an address on the public internet: not loopback, private, link-local,
/// shared (carrier NAT), documentation, benchmarking, multicast, reserved or unspecified, nor an
/// IPv6 form of one of those.
pub fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public_v4(v4);
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return public_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8));
            }
            // 6to4 (2002::/16) reaches the IPv4 address in its second and third groups.
            if s[0] == 0x2002 {
                return public_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
            }
            // Only global unicast (2000::/3), less documentation (2001:db8::/32) and Teredo
            // (2001::/32): everything else — loopback, IPv4-compatible, unique local,
            // link-local, site-local, multicast, local NAT64 — is not the public internet.
            (s[0] & 0xe000) == 0x2000 && !(s[0] == 0x2001 && (s[1] == 0x0db8 || s[1] == 0))
        }
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_unspecified()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (carrier NAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

/// Refuses a URL that is not http(s), or whose host is an address that is not public (unless
/// `allow_private`). Host names are checked when resolved ([`PublicOnly`]).
pub fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{url:?} is not an http:// or https:// URL"));
    }
    if allow_private {
        return Ok(());
    }
    // The parser normalizes an address's every spelling (`http://2130706433/` is 127.0.0.1).
    let host = parsed.host_str().unwrap_or_default();
    let ip = match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") => {
            return Err(format!("{url:?} is on this host: webhooks go to public addresses only"));
        }
        Err(_) => return Ok(()),
    };
    if public(ip) {
        Ok(())
    } else {
        Err(format!("{url:?} is not a public address: webhooks go to public addresses only"))
    }
}

/// The HTTP client's resolver: the system's lookup, keeping public addresses only. A name with
/// none is an error naming it.
pub struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addresses.iter().copied().filter(|a| public(a.ip())).collect();
            if public.is_empty() {
                let error: Box<dyn std::error::Error + Send + Sync> = format!(
                    "{host} resolves to no public address ({addresses:?}): webhooks go to public addresses only"
                )
                .into();
                return Err(error);
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

/// The client webhooks are posted with: no redirects, no proxy, `timeout` a request, and
/// [`PublicOnly`] unless `allow_private`.
pub fn client(timeout: Duration, allow_private: bool) -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut builder =
        reqwest::Client::builder().timeout(timeout).redirect(reqwest::redirect::Policy::none()).no_proxy();
    if !allow_private {
        builder = builder.dns_resolver(Arc::new(PublicOnly));
    }
    builder.build().expect("an HTTP client with the process's TLS provider")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instance_metadata_service_loopback_and_private_networks_are_refused() {
        for refused in [
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:8080/hook",
            "http://10.0.0.7/hook",
            "http://172.16.4.4/hook",
            "http://192.168.1.1/hook",
            "http://100.64.0.1/hook",
            "http://0.0.0.0/hook",
            "http://[::1]/hook",
            "http://[fd00:ec2::254]/hook",
            "http://[::ffff:169.254.169.254]/hook",
            "http://[64:ff9b::a00:1]/hook",
            "http://[::127.0.0.1]/hook",
            "http://[64:ff9b:1::1]/hook",
            "http://[fec0::1]/hook",
            "http://[100::1]/hook",
            "http://[2002:a9fe:a9fe::1]/hook",
            "http://[2001:0:4136:e378::1]/hook",
            "http://[2001:db8::1]/hook",
            "http://localhost:3000/hook",
            "http://api.localhost/hook",
            "http://2130706433/hook",
        ] {
            assert!(check_url(refused, false).is_err(), "{refused} was allowed");
            assert!(check_url(refused, true).is_ok(), "{refused} is allowed when private addresses are");
        }
        for allowed in [
            "https://hooks.example.com/roomcast",
            "http://93.184.216.34/hook",
            "https://[2606:4700::1111]/",
            "https://[64:ff9b::5db8:d822]/",
        ] {
            assert_eq!(check_url(allowed, false), Ok(()), "{allowed}");
        }
        assert!(check_url("ftp://example.com/", true).is_err());
        assert!(check_url("not a url", true).is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_to_private_addresses_reaches_nothing() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let error = match PublicOnly.resolve(name).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("no public address"), "{error}");
        // And through the client: the request is never made.
        let refused = client(Duration::from_secs(2), false).post("http://localhost:9/hook").send().await;
        let error = format!("{:?}", refused.expect_err("a request to loopback"));
        assert!(error.contains("no public address"), "{error}");
    }
}
