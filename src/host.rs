//! The host's fully-qualified name: the default `origin` header.

/// The fully-qualified name of this machine, as Python's `socket.getfqdn()` gives it:
/// the canonical name the resolver returns for the host name, or the host name itself
/// when the resolver knows no better.
pub fn fqdn() -> String {
    let hostname = dns_lookup::get_hostname().unwrap_or_else(|_| "localhost".to_owned());
    let hints = dns_lookup::AddrInfoHints {
        flags: libc::AI_CANONNAME,
        ..dns_lookup::AddrInfoHints::default()
    };
    let canonical = dns_lookup::getaddrinfo(Some(&hostname), None, Some(hints))
        .ok()
        .and_then(|mut answers| answers.find_map(|answer| answer.ok().and_then(|a| a.canonname)))
        .filter(|name| !name.is_empty());
    canonical.unwrap_or(hostname)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fqdn_is_a_name() {
        let name = super::fqdn();
        assert!(
            !name.is_empty() && !name.contains(char::is_whitespace),
            "{name:?}"
        );
    }
}
