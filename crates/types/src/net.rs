//! Which webhook targets are allowed. Private, loopback and link-local addresses are refused
//! unless the deployment allows them, so a notification cannot be aimed at internal services.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// True for addresses a webhook must not reach by default.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden_v4(v4),
            None => forbidden_v6(v6),
        },
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
        || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
}

/// Checks a webhook URL without DNS: http(s), a host, and — unless `allow_private` — no
/// literal forbidden IP and no `localhost`. The worker checks resolved addresses again.
pub fn check_url_syntax(raw: &str, allow_private: bool) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    let host = url.host().ok_or("must have a host")?;
    if allow_private {
        return Ok(url);
    }
    let forbidden = match host {
        url::Host::Ipv4(ip) => is_forbidden_ip(IpAddr::V4(ip)),
        url::Host::Ipv6(ip) => is_forbidden_ip(IpAddr::V6(ip)),
        url::Host::Domain(d) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
    };
    if forbidden {
        return Err("points to a private, loopback or link-local address, which is not allowed".into());
    }
    Ok(url)
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
