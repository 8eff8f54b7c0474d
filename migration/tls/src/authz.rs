//! `tls-authz`: which client certificates may feed an incoming migration.
//!
//! The identity matched is the client certificate's subject distinguished name in RFC 4514
//! form, most specific first, as QEMU's `authz-simple` and `authz-list` objects see it:
//! `CN=src.example.com,O=Example,C=GB`.

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Let the client in.
    Allow,
    /// Turn the client away.
    Deny,
}

impl Policy {
    /// Parse QEMU's `allow` / `deny`.
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "allow" => Some(Policy::Allow),
            "deny" => Some(Policy::Deny),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Allow => "allow",
            Policy::Deny => "deny",
        }
    }
}

/// How a rule's pattern is compared with the identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchFormat {
    /// Byte for byte.
    Exact,
    /// `*` matches any run of characters, `?` any one character (QEMU's `glob`).
    Glob,
}

impl MatchFormat {
    /// Parse QEMU's `exact` / `glob`.
    pub fn parse(s: &str) -> Option<MatchFormat> {
        match s {
            "exact" => Some(MatchFormat::Exact),
            "glob" => Some(MatchFormat::Glob),
            _ => None,
        }
    }

    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchFormat::Exact => "exact",
            MatchFormat::Glob => "glob",
        }
    }
}

/// One rule of an `authz-list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzRule {
    /// What the identity is compared with.
    pub pattern: String,
    /// What a match decides.
    pub policy: Policy,
    /// How it is compared.
    pub format: MatchFormat,
}

/// An authorization object: QEMU's `authz-simple` (one identity) or `authz-list` (rules in
/// order, first match wins, else the default policy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authz {
    /// Exactly this identity is allowed.
    Simple {
        /// The allowed distinguished name.
        identity: String,
    },
    /// Ordered rules and a default.
    List {
        /// Decision when no rule matches.
        policy: Policy,
        /// Rules, first match wins.
        rules: Vec<AuthzRule>,
    },
}

impl Authz {
    /// Whether `identity` may connect.
    pub fn is_allowed(&self, identity: &str) -> bool {
        match self {
            Authz::Simple { identity: id } => id == identity,
            Authz::List { policy, rules } => {
                let hit = rules.iter().find(|r| match r.format {
                    MatchFormat::Exact => r.pattern == identity,
                    MatchFormat::Glob => glob(r.pattern.as_bytes(), identity.as_bytes()),
                });
                hit.map_or(*policy, |r| r.policy) == Policy::Allow
            }
        }
    }
}

/// `*` and `?` wildcard match (iterative, linear backtracking on the last `*`).
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, s, want) in [
            ("CN=*", "CN=src", true),
            ("CN=src,O=*", "CN=src,O=Ferry", true),
            ("CN=s?c", "CN=src", true),
            ("CN=s?c", "CN=srcx", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("", "x", false),
        ] {
            assert_eq!(glob(p.as_bytes(), s.as_bytes()), want, "{p} vs {s}");
        }
    }

    #[test]
    fn lists_take_the_first_match() {
        let list = Authz::List {
            policy: Policy::Deny,
            rules: vec![
                AuthzRule {
                    pattern: "CN=evil.example.com".into(),
                    policy: Policy::Deny,
                    format: MatchFormat::Exact,
                },
                AuthzRule {
                    pattern: "CN=*.example.com".into(),
                    policy: Policy::Allow,
                    format: MatchFormat::Glob,
                },
            ],
        };
        assert!(list.is_allowed("CN=src.example.com"));
        assert!(!list.is_allowed("CN=evil.example.com"));
        assert!(!list.is_allowed("CN=src.example.org"));
        let simple = Authz::Simple {
            identity: "CN=src".into(),
        };
        assert!(simple.is_allowed("CN=src") && !simple.is_allowed("CN=src2"));
    }
}
