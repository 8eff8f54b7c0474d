//! Protocol types: greeting, request validation, replies.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::QmpError;

/// `VersionTriple` (field order as QEMU prints it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    pub micro: u32,
    pub minor: u32,
    pub major: u32,
}

/// `VersionInfo`: the greeting's `version` and the `query-version` result.
/// The key stays `qemu` (clients such as `qapi-rs` require it); the product
/// name goes into `package`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    pub package: String,
}

impl VersionInfo {
    pub fn new(major: u32, minor: u32, micro: u32, package: impl Into<String>) -> Self {
        Self {
            qemu: VersionTriple {
                micro,
                minor,
                major,
            },
            package: package.into(),
        }
    }
}

/// `{"QMP": {"version": ..., "capabilities": []}}`.
#[derive(Debug, Clone, Serialize)]
pub struct Greeting<'a> {
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody<'a>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GreetingBody<'a> {
    pub version: &'a VersionInfo,
    /// Always empty: out-of-band execution is not offered.
    pub capabilities: [&'static str; 0],
}

impl<'a> Greeting<'a> {
    pub fn new(version: &'a VersionInfo) -> Self {
        Self {
            qmp: GreetingBody {
                version,
                capabilities: [],
            },
        }
    }
}

/// A structurally valid command request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub command: String,
    pub arguments: Map<String, Value>,
}

/// A request that failed the structural checks; `id` is echoed if it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub id: Option<Value>,
    pub error: QmpError,
}

/// QEMU's `qmp_dispatch_check_obj` (OOB never allowed: it is not offered).
pub fn parse_request(value: Value) -> Result<Request, RequestError> {
    let Value::Object(mut obj) = value else {
        return Err(RequestError {
            id: None,
            error: QmpError::generic("QMP input must be a JSON object"),
        });
    };
    let id = obj.remove("id");
    let fail = |desc: String| {
        Err(RequestError {
            id: id.clone(),
            error: QmpError::generic(desc),
        })
    };
    match obj.get("execute") {
        Some(Value::String(_)) | None => {}
        Some(_) => return fail("QMP input member 'execute' must be a string".into()),
    }
    match obj.get("arguments") {
        Some(Value::Object(_)) | None => {}
        Some(_) => return fail("QMP input member 'arguments' must be an object".into()),
    }
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments"))
    {
        return fail(format!("QMP input member '{key}' is unexpected"));
    }
    let command = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        _ => return fail("QMP input lacks member 'execute'".into()),
    };
    let arguments = match obj.remove("arguments") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    Ok(Request {
        id,
        command,
        arguments,
    })
}

/// `{"return": ..., "id": ...}`.
#[derive(Debug, Serialize)]
pub struct ReturnReply<'a> {
    #[serde(rename = "return")]
    pub ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
}

/// `{"error": {"class": ..., "desc": ...}, "id": ...}`.
#[derive(Debug, Serialize)]
pub struct ErrorReply<'a> {
    pub error: &'a QmpError,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desc(v: Value) -> (Option<Value>, String) {
        let e = parse_request(v).unwrap_err();
        (e.id, e.error.desc)
    }

    #[test]
    fn structural_checks() {
        assert_eq!(desc(json!([1, 2])).1, "QMP input must be a JSON object");
        assert_eq!(
            desc(json!({"execute": 42, "id": 6})),
            (
                Some(json!(6)),
                "QMP input member 'execute' must be a string".into()
            )
        );
        assert_eq!(
            desc(json!({"exec": "x", "id": 7})).1,
            "QMP input member 'exec' is unexpected"
        );
        assert_eq!(
            desc(json!({"execute": "x", "arguments": []})).1,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(json!({"exec-oob": "x"})).1,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            desc(json!({"id": "a"})),
            (Some(json!("a")), "QMP input lacks member 'execute'".into())
        );
        let r = parse_request(json!({"execute": "x", "id": {"n": [1]}})).unwrap();
        assert_eq!(r.id, Some(json!({"n": [1]})));
        assert!(r.arguments.is_empty());
    }
}
