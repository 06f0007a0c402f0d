//! Which webhook targets are allowed. Private, loopback and link-local addresses are refused
//! unless the deployment allows them, so a notification cannot be aimed at internal services.
//! The API checks literal URLs early (422); the worker checks every resolved address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use url::{Host, Url};

/// Addresses a webhook must not reach unless private targets are allowed: loopback, private,
/// link-local, unspecified, CGNAT, unique-local, multicast/broadcast, and IPv6 forms that carry
/// such an IPv4 address (mapped, compatible, NAT64 `64:ff9b::/96`).
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            if let Some(v4) = v6.to_ipv4() {
                // `::1` and `::` land in 0.0.0.0/8, which is forbidden too.
                return forbidden_v4(v4);
            }
            if nat64 {
                return forbidden_v4(Ipv4Addr::from(u128::from(v6) as u32));
            }
            forbidden_v6(v6)
        }
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 0 // "this network", 0.0.0.0 included: Linux connects it to the local host
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && (b & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || ip.is_broadcast()
        || ip.is_multicast()
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || (ip.segments()[0] & 0xffc0) == 0xfec0 // deprecated site-local, still routed by some
        || ip.is_multicast()
}

/// `localhost` and its subdomains (RFC 6761), which resolve to loopback without asking DNS.
fn is_localhost(domain: &str) -> bool {
    let domain = domain.trim_end_matches('.');
    domain == "localhost" || domain.ends_with(".localhost")
}

/// The API's early check, without DNS: http(s), a host, and (unless `allow_private`) no
/// literal forbidden address and no `localhost`. Messages never repeat the URL's userinfo.
pub fn check_url_syntax(url: &str, allow_private: bool) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("webhook URL is not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("webhook URL must be http or https, not `{}`", parsed.scheme()));
    }
    let forbidden = match parsed.host().ok_or("webhook URL has no host")? {
        Host::Domain(domain) => is_localhost(domain),
        Host::Ipv4(ip) => is_forbidden_ip(ip.into()),
        Host::Ipv6(ip) => is_forbidden_ip(ip.into()),
    };
    if forbidden && !allow_private {
        let host = parsed.host_str().unwrap_or_default();
        return Err(format!("webhook URL host `{host}` is a loopback or private address"));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_targets_are_refused() {
        for bad in [
            "http://127.0.0.1/x",
            "http://10.1.2.3/",
            "http://172.16.0.1/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://localhost:8080/",
            "ftp://example.com/",
            "not a url",
        ] {
            assert!(check_url_syntax(bad, false).is_err(), "{bad} must be refused");
        }
        assert!(check_url_syntax("http://127.0.0.1/x", true).is_ok());
        assert!(check_url_syntax("https://hooks.example.com/a?b=c", false).is_ok());
        assert!(check_url_syntax("http://8.8.8.8/", false).is_ok());
    }
}
