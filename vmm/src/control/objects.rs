//! User-creatable objects (`object-add`, `object-del`, `--object`): TLS credentials
//! (`tls-creds-x509`) and the authorization objects `tls-authz` names (`authz-simple`,
//! `authz-list`), with QEMU's types, properties and messages.

use super::{Controller, lock};
use crate::qmp::{Args, QmpError};
use ferry_tls::{Authz, AuthzRule, Endpoint, MatchFormat, Policy, X509Creds};
use migration::TlsParams;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Object types `object-add` creates.
const TYPES: &[&str] = &["tls-creds-x509", "authz-simple", "authz-list"];

/// One object.
#[derive(Debug)]
pub(super) enum Object {
    TlsCreds(Arc<X509Creds>),
    Authz(Authz),
}

impl Object {
    fn type_name(&self) -> &'static str {
        match self {
            Object::TlsCreds(_) => "tls-creds-x509",
            Object::Authz(Authz::Simple { .. }) => "authz-simple",
            Object::Authz(Authz::List { .. }) => "authz-list",
        }
    }
}

/// The objects by id.
#[derive(Debug, Default)]
pub(super) struct Objects(BTreeMap<String, Object>);

/// The migration's TLS parameters as set (`""`: not set).
#[derive(Clone, Debug, Default)]
pub(super) struct TlsNames {
    pub(super) creds: String,
    pub(super) hostname: String,
    pub(super) authz: String,
}

/// QEMU's identifier rule: a letter, then letters, digits, `-`, `.`, `_`.
fn is_identifier(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

fn policy(a: &mut Args, name: &str) -> Result<Option<Policy>, QmpError> {
    let Some(p) = a.optional_enum(name, &["allow", "deny"])? else {
        return Ok(None);
    };
    Ok(Policy::parse(&p))
}

fn parse(ty: &str, id: &str, a: &mut Args) -> Result<Object, QmpError> {
    Ok(match ty {
        "tls-creds-x509" => {
            let dir = a.required_str("dir")?;
            let endpoint = a
                .optional_enum("endpoint", &["client", "server"])?
                .unwrap_or_else(|| "client".into());
            let verify_peer = a.optional_qdev_bool("verify-peer")?.unwrap_or(true);
            // Accepted for compatibility: certificates are checked at every handshake.
            let _ = a.optional_qdev_bool("sanity-check")?;
            let endpoint = Endpoint::parse(&endpoint).unwrap_or(Endpoint::Client);
            let creds = X509Creds::load(id, Path::new(&dir), endpoint, verify_peer)
                .map_err(|e| QmpError::generic(migration::chain(&e)))?;
            Object::TlsCreds(Arc::new(creds))
        }
        "authz-simple" => Object::Authz(Authz::Simple {
            identity: a.required_str("identity")?,
        }),
        "authz-list" => {
            let default = policy(a, "policy")?.unwrap_or(Policy::Deny);
            let mut rules = Vec::new();
            for (i, r) in a
                .optional_array("rules")?
                .unwrap_or_default()
                .into_iter()
                .enumerate()
            {
                let Value::Object(m) = r else {
                    return Err(QmpError::invalid_parameter_type(
                        &format!("rules[{i}]"),
                        "object",
                    ));
                };
                let mut ra = Args::nested(m, format!("rules[{i}]"));
                let pattern = ra.required_str("match")?;
                let Some(p) = policy(&mut ra, "policy")? else {
                    return Err(QmpError::missing_parameter(&format!("rules[{i}].policy")));
                };
                let format = ra
                    .optional_enum("format", &["exact", "glob"])?
                    .and_then(|f| MatchFormat::parse(&f))
                    .unwrap_or(MatchFormat::Exact);
                ra.finish()?;
                rules.push(AuthzRule {
                    pattern,
                    policy: p,
                    format,
                });
            }
            Object::Authz(Authz::List {
                policy: default,
                rules,
            })
        }
        other => return Err(QmpError::invalid_enum_value("qom-type", other)),
    })
}

impl Objects {
    /// `object-add`: nothing changes unless the object is complete and loads.
    pub(super) fn add(&mut self, args: Map<String, Value>) -> Result<(), QmpError> {
        let mut a = Args::new(args);
        let ty = a.required_str("qom-type")?;
        let id = a.required_str("id")?;
        if !TYPES.contains(&ty.as_str()) {
            return Err(QmpError::invalid_enum_value("qom-type", &ty));
        }
        if !is_identifier(&id) {
            return Err(QmpError::parameter_expects("id", "an identifier"));
        }
        if self.0.contains_key(&id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let obj = parse(&ty, &id, &mut a)?;
        a.finish()?;
        self.0.insert(id, obj);
        Ok(())
    }

    /// `object-del`. A migration already running keeps the credentials it started with.
    pub(super) fn del(&mut self, id: &str) -> Result<(), QmpError> {
        self.0
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| QmpError::generic(format!("object '{id}' not found")))
    }

    /// `qom-list /objects`-like view: id and type of each object.
    pub(super) fn list(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|(id, o)| json!({"name": id, "type": format!("child<{}>", o.type_name())}))
                .collect(),
        )
    }

    /// Resolve the migration's TLS parameters for `endpoint` (`None`: `tls-creds` not set).
    pub(super) fn tls(
        &self,
        names: &TlsNames,
        endpoint: Endpoint,
    ) -> Result<Option<TlsParams>, String> {
        if names.creds.is_empty() {
            return Ok(None);
        }
        let creds = match self.0.get(&names.creds) {
            Some(Object::TlsCreds(c)) => c.clone(),
            Some(_) => {
                return Err(format!(
                    "Object with id '{}' is not TLS credentials",
                    names.creds
                ));
            }
            None => return Err(format!("No TLS credentials with id '{}'", names.creds)),
        };
        if creds.endpoint() != endpoint {
            let side = match endpoint {
                Endpoint::Client => "migration source",
                Endpoint::Server => "migration destination",
            };
            return Err(format!(
                "TLS credentials '{}' are for endpoint={}; a {side} needs endpoint={}",
                names.creds,
                creds.endpoint().as_str(),
                endpoint.as_str()
            ));
        }
        let authz = if endpoint == Endpoint::Server && !names.authz.is_empty() {
            match self.0.get(&names.authz) {
                Some(Object::Authz(a)) => Some((names.authz.clone(), a.clone())),
                _ => {
                    return Err(format!(
                        "Cannot find authorization object '{}'",
                        names.authz
                    ));
                }
            }
        } else {
            None
        };
        Ok(Some(TlsParams {
            creds,
            hostname: (!names.hostname.is_empty()).then(|| names.hostname.clone()),
            authz,
        }))
    }
}

/// QEMU's option syntax split at its commas (`,,` is a literal comma).
pub fn split_opts(value: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// `--object` in QEMU's forms: `TYPE,id=ID,key=value,...` (`,,` is a literal comma) or a
/// JSON object, into `object-add` arguments.
pub fn parse_object_arg(s: &str) -> Result<Map<String, Value>, String> {
    if s.trim_start().starts_with('{') {
        return match serde_json::from_str(s) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(format!("Invalid --object '{s}': not a JSON object")),
        };
    }
    let mut m = Map::new();
    for (i, p) in split_opts(s).into_iter().enumerate() {
        match p.split_once('=') {
            Some((k, v)) => m.insert(k.to_owned(), Value::String(v.to_owned())),
            None if i == 0 => m.insert("qom-type".into(), Value::String(p)),
            None => return Err(format!("Invalid --object '{s}': '{p}' is not KEY=VALUE")),
        };
    }
    Ok(m)
}

impl Controller {
    /// `object-add`.
    pub(super) fn object_add(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        lock(&self.objects).add(args)?;
        Ok(json!({}))
    }

    /// `object-del`.
    pub(super) fn object_del(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let id = a.required_str("id")?;
        a.finish()?;
        lock(&self.objects).del(&id)?;
        Ok(json!({}))
    }

    /// The objects (`__org.ferry_query-objects`).
    pub(super) fn query_objects(&self) -> Value {
        lock(&self.objects).list()
    }

    /// The TLS setup for a migration from (`Client`) or to (`Server`) this process.
    pub(super) fn tls_params(&self, endpoint: Endpoint) -> Result<Option<TlsParams>, String> {
        let names = lock(&self.tls).clone();
        lock(&self.objects).tls(&names, endpoint)
    }

    /// Create an object from a `--object` argument.
    pub fn add_object_arg(&self, spec: &str) -> Result<(), String> {
        let args = parse_object_arg(spec)?;
        lock(&self.objects)
            .add(args)
            .map_err(|e| format!("Invalid --object '{spec}': {}", e.desc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_args_parse_like_qemu() {
        let m = parse_object_arg("tls-creds-x509,id=tls0,dir=/a,,b,endpoint=server").unwrap();
        assert_eq!(m["qom-type"], "tls-creds-x509");
        assert_eq!(m["dir"], "/a,b");
        assert_eq!(m["endpoint"], "server");
        let m =
            parse_object_arg(r#"{"qom-type":"authz-simple","id":"a","identity":"CN=x"}"#).unwrap();
        assert_eq!(m["identity"], "CN=x");
        assert!(parse_object_arg("authz-simple,id=a,oops").is_err());
    }

    #[test]
    fn objects_refuse_bad_input_and_change_nothing() {
        let mut o = Objects::default();
        let add =
            |o: &mut Objects, v: Value| o.add(v.as_object().unwrap().clone()).map_err(|e| e.desc);
        add(
            &mut o,
            json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=x"}),
        )
        .unwrap();
        let dup = add(
            &mut o,
            json!({"qom-type": "authz-simple", "id": "a", "identity": "CN=y"}),
        );
        assert!(dup.unwrap_err().contains("duplicate property 'a'"));
        let bad = add(&mut o, json!({"qom-type": "nope", "id": "b"}));
        assert_eq!(
            bad.unwrap_err(),
            "Parameter 'qom-type' does not accept value 'nope'"
        );
        let bad = add(
            &mut o,
            json!({"qom-type": "authz-simple", "id": "9x", "identity": "y"}),
        );
        assert_eq!(bad.unwrap_err(), "Parameter 'id' expects an identifier");
        let bad = add(
            &mut o,
            json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexistent", "endpoint": "server"}),
        );
        assert!(
            bad.unwrap_err()
                .starts_with("tls-creds-x509 't': cannot read /nonexistent/ca-cert.pem")
        );
        let bad = add(
            &mut o,
            json!({"qom-type": "authz-list", "id": "l", "rules": [{"match": "CN=*", "policy": "maybe"}]}),
        );
        assert!(bad.is_err());
        assert_eq!(o.0.len(), 1, "only the first object exists");
        let names = TlsNames {
            creds: "a".into(),
            ..TlsNames::default()
        };
        assert_eq!(
            o.tls(&names, Endpoint::Server).unwrap_err(),
            "Object with id 'a' is not TLS credentials"
        );
        o.del("a").unwrap();
        assert_eq!(o.del("a").unwrap_err().desc, "object 'a' not found");
    }
}
