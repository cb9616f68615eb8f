//! Where outbound requests may go. Provider calls go to their connector's hosts only,
//! webhook deliveries to any public address; private, loopback, link-local and other
//! special-purpose addresses are refused unless the deployment allows them
//! (`AMPLOG_ALLOW_PRIVATE_NETWORKS=true`, for the simulator, the demo and tests). The check
//! runs on every connection: IP-literal hosts before the request, names after DNS
//! resolution (the client's resolver drops addresses that are not allowed), and no client
//! follows redirects.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;
use std::net::{IpAddr, SocketAddr};

/// The deployment's outbound rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    pub allow_private: bool,
}

/// The environment variable that allows private addresses.
pub const ALLOW_PRIVATE_VAR: &str = "AMPLOG_ALLOW_PRIVATE_NETWORKS";

impl Egress {
    /// From `AMPLOG_ALLOW_PRIVATE_NETWORKS` (`true`/`1`/`yes`); private addresses refused otherwise.
    pub fn from_env() -> Egress {
        let allow = std::env::var(ALLOW_PRIVATE_VAR).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        Egress { allow_private: allow }
    }

    /// Private addresses allowed: the simulator, the demo, tests on loopback.
    pub fn private() -> Egress {
        Egress { allow_private: true }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip)
    }

    /// Checks a URL before a request is sent to it: http or https, a host, and, when the
    /// host is an address, one that may be connected to (names are checked by the resolver).
    pub fn check(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!("`{}` URLs are not allowed", url.scheme()));
        }
        let ip = match url.host() {
            None => return Err("the URL has no host".into()),
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(name)) => {
                if !self.allow_private && (name == "localhost" || name.ends_with(".localhost")) {
                    return Err(format!("`{name}` is a private address ({ALLOW_PRIVATE_VAR} allows it)"));
                }
                return Ok(());
            }
        };
        match self.allows(ip) {
            true => Ok(()),
            false => Err(format!("{ip} is a private or special-purpose address ({ALLOW_PRIVATE_VAR} allows it)")),
        }
    }

    /// An HTTP client that connects only where this rule allows and follows no redirect.
    pub fn client(&self) -> reqwest::ClientBuilder {
        self.client_from(crate::connector::http_client())
    }

    /// `builder` made to connect only where this rule allows and to follow no redirect.
    pub fn client_from(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder.dns_resolver(AllowedOnly(*self)).redirect(reqwest::redirect::Policy::none())
    }
}

/// Checks a destination's URL when it is created: well-formed, at most 2,048 bytes,
/// `https` (plain `http` only where private addresses are allowed), and not an address the
/// rule forbids. Names are checked again on every delivery, after DNS resolution.
pub fn check_destination(url: &str, egress: Egress) -> Result<(), String> {
    if url.len() > 2048 {
        return Err("a destination URL must be at most 2,048 bytes".into());
    }
    let parsed = Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if parsed.scheme() != "https" && !egress.allow_private {
        return Err(format!("a destination must be https, not {}", parsed.scheme()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("a destination URL must not carry credentials".into());
    }
    egress.check(&parsed)
}

/// Resolves with the system's resolver and keeps only the addresses the rule allows.
struct AllowedOnly(Egress);

impl Resolve for AllowedOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = self.0;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found.into_iter().filter(|a| egress.allows(a.ip())).collect();
            if allowed.is_empty() {
                return Err(format!(
                    "{host} resolves to no address amplog may connect to (private or special-purpose; \
                     {ALLOW_PRIVATE_VAR} allows them)"
                )
                .into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Whether `ip` is a globally reachable unicast address: not private, loopback, link-local
/// (169.254.169.254, the cloud metadata service, among them), shared (CGNAT), unspecified,
/// documentation, benchmarking, multicast or reserved; IPv4 inside IPv6 judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let [o0, o1, ..] = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_documentation()
                || o0 == 0
                || (o0 == 100 && (o1 & 0xc0) == 64)
                || (o0 == 192 && o1 == 0)
                || (o0 == 198 && (o1 & 0xfe) == 18)
                || o0 >= 224)
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = a.segments();
            let embedded_v4 =
                |hi: u16, lo: u16| is_public(IpAddr::V4(std::net::Ipv4Addr::from(((hi as u32) << 16) | lo as u32)));
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0064 && s[1] == 0xff9b && !embedded_v4(s[6], s[7]))
                || (s[0] == 0x2002 && !embedded_v4(s[1], s[2]))
                || s[..6] == [0; 6])
        }
    }
}

/// A host calls may go to: a name (or `*.suffix`: any name below `suffix`, not `suffix`
/// itself), and a port when the pattern came from a URL that named one (`host:*`: any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    pub host: String,
    pub port: Option<u16>,
    pub any_port: bool,
}

impl HostPattern {
    /// The host and port of a URL, exactly.
    pub fn of_url(url: &str) -> Option<HostPattern> {
        let url = Url::parse(url).ok()?;
        Some(HostPattern { host: url.host_str()?.to_ascii_lowercase(), port: url.port(), any_port: false })
    }

    /// A catalog pattern, on the scheme's default port (`host:*` on any port).
    pub fn name(pattern: &str) -> HostPattern {
        let (host, any_port) = match pattern.strip_suffix(":*") {
            Some(host) => (host, true),
            None => (pattern, false),
        };
        HostPattern { host: host.to_ascii_lowercase(), port: None, any_port }
    }

    /// Whether `url`'s host and port match. Case-insensitive; a trailing dot is ignored.
    pub fn matches(&self, url: &Url) -> bool {
        let Some(host) = url.host_str() else { return false };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let name = match self.host.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
            None => host == self.host,
        };
        name && (self.any_port || url.port() == self.port)
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.port, self.any_port) {
            (_, true) => write!(f, "{}:*", self.host),
            (Some(port), _) => write!(f, "{}:{port}", self.host),
            (None, _) => f.write_str(&self.host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_purpose_addresses_are_not_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn urls_are_checked_before_any_request() {
        let strict = Egress::default();
        for bad in [
            "http://127.0.0.1:8080/x",
            "http://[::1]/",
            "https://169.254.169.254/latest/meta-data",
            "http://localhost/",
            "ftp://example.com/",
            "http://2130706433/",
            "http://0x7f.1/",
        ] {
            assert!(strict.check(&Url::parse(bad).unwrap()).is_err(), "{bad}");
        }
        assert!(strict.check(&Url::parse("https://hooks.example.com/a").unwrap()).is_ok());
        assert!(Egress::private().check(&Url::parse("http://127.0.0.1:8080/x").unwrap()).is_ok());
    }

    #[test]
    fn host_patterns() {
        let url = |u: &str| Url::parse(u).unwrap();
        let api = HostPattern::name("api.hubapi.com");
        let org = HostPattern::name("*.my.salesforce.com");
        assert!(api.matches(&url("https://api.hubapi.com/crm")));
        assert!(!api.matches(&url("https://api.hubapi.com:8443/crm")));
        assert!(org.matches(&url("https://ACME.my.salesforce.com./x")));
        assert!(!org.matches(&url("https://my.salesforce.com/")));
        assert!(!org.matches(&url("https://evil-my.salesforce.com/")));
        assert!(!api.matches(&url("https://api.hubapi.com.evil.example/")));
        let sim = HostPattern::of_url("http://127.0.0.1:8091").unwrap();
        assert!(sim.matches(&url("http://127.0.0.1:8091/crm")));
        assert!(!sim.matches(&url("http://127.0.0.1:5432/")));
        assert!(HostPattern::name("127.0.0.1:*").matches(&url("http://127.0.0.1:5432/")));
    }
}
