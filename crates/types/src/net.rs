//! Which webhook targets are allowed. Private, loopback and link-local addresses are refused
//! unless the deployment allows them, so a notification cannot be aimed at internal services.
//! The API checks literal URLs early (422); the worker checks every resolved address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use url::{Host, Url};

/// Addresses a webhook must not reach unless private targets are allowed: every address that
/// is not globally reachable by the IANA special-purpose registries (IPv4 and IPv6), and IPv6
/// forms that carry a forbidden IPv4 address (mapped, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`).
/// Teredo (`2001::/32`) is refused whole, inside `2001::/23`.
///
/// Written out rather than taken from a crate: std's `is_global` is still unstable
/// (rust-lang/rust#27709) and no well-kept crate classifies the embeddings.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

/// IPv4 blocks (address, prefix length) that are not globally reachable (IANA IPv4
/// Special-Purpose Address Registry, plus multicast and the reserved 240/4).
const FORBIDDEN_V4: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // "this network" (Linux connects 0.0.0.0 to the local host)
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // shared address space (CGNAT)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link-local (cloud metadata services)
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation TEST-NET-1
    ([192, 88, 99, 0], 24),  // deprecated 6to4 relay anycast
    ([192, 168, 0, 0], 16),  // private
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation TEST-NET-2
    ([203, 0, 113, 0], 24),  // documentation TEST-NET-3
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, and the limited broadcast 255.255.255.255
];

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let ip = u32::from(ip);
    FORBIDDEN_V4.iter().any(|&(net, len)| ip >> (32 - len) == u32::from_be_bytes(net) >> (32 - len))
}

/// IPv6 blocks inside the global unicast range 2000::/3 that are not globally reachable.
const FORBIDDEN_V6_IN_GLOBAL: &[(u128, u8)] = &[
    (0x2001_0000 << 96, 23), // IETF protocol assignments: Teredo, benchmarking, ORCHID, ...
    (0x2001_0db8 << 96, 32), // documentation
    (0x3fff_0000 << 96, 20), // documentation (RFC 9637)
];

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    let bits = u128::from(ip);
    let low_v4 = Ipv4Addr::from(bits as u32);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    if bits >> 32 == 0x0064_ff9b << 64 {
        return forbidden_v4(low_v4); // NAT64 well-known prefix: reaches the embedded IPv4
    }
    if bits >> 125 != 0b001 {
        // Outside 2000::/3: loopback, unspecified, IPv4-compatible, discard 100::/64, local NAT64
        // 64:ff9b:1::/48, unique-local, link-local, site-local, multicast — none is global.
        return true;
    }
    if bits >> 112 == 0x2002 {
        return forbidden_v4(Ipv4Addr::from((bits >> 80) as u32)); // 6to4 carries an IPv4 address
    }
    FORBIDDEN_V6_IN_GLOBAL.iter().any(|&(net, len)| bits >> (128 - len) == net >> (128 - len))
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
        return Err(format!(
            "webhook URL host `{host}` is a loopback or private address (not globally reachable); WEBHOOK_ALLOW_PRIVATE=true allows such targets"
        ));
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
            "http://[2002:7f00:1::]/",
            "http://198.18.0.1/",
            "http://192.0.0.1/",
            "http://240.0.0.1/",
            "http://192.0.2.7/",
            "http://[100::1]/",
            "http://[2001:db8::1]/",
            "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[64:ff9b:1::8.8.8.8]/",
            "http://255.255.255.255/",
            "http://224.0.0.1/",
            "http://[ff02::1]/",
            "http://[::]/",
            "http://[::127.0.0.1]/",
            "ftp://example.com/",
            "not a url",
        ] {
            assert!(check_url_syntax(bad, false).is_err(), "{bad} must be refused");
        }
        assert!(check_url_syntax("http://127.0.0.1/x", true).is_ok());
        assert!(check_url_syntax("https://hooks.example.com/a?b=c", false).is_ok());
        assert!(check_url_syntax("http://8.8.8.8/", false).is_ok());
        for good in
            ["http://[2606:4700::1111]/", "http://[2002:808:808::]/", "http://[64:ff9b::8.8.8.8]/", "http://1.1.1.1/"]
        {
            assert!(check_url_syntax(good, false).is_ok(), "{good} is globally reachable");
        }
    }
}
