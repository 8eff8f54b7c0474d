//! QAPI type descriptions of Ferry's commands and events, and `query-qmp-schema` built from
//! them: the command table (`commands.rs`) declares each command's arguments and return type
//! here, so the schema, `query-commands` and dispatch come from one list.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// A QAPI type.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ty {
    Str,
    Int,
    Bool,
    /// Any JSON value (QAPI `any`).
    Any,
    List(&'static Ty),
    Obj(&'static Struct),
    Enum(&'static Enum),
}

/// A member of a struct or of a command's arguments.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) name: &'static str,
    pub(super) ty: Ty,
    pub(super) optional: bool,
}

/// A QAPI struct; with `variants`, a union whose tag is its first member.
#[derive(Debug)]
pub(super) struct Struct {
    pub(super) name: &'static str,
    pub(super) members: &'static [Member],
    pub(super) variants: &'static [(&'static str, &'static Struct)],
}

/// A command's arguments.
#[derive(Debug, Clone, Copy)]
pub(super) enum Params {
    /// These members (the schema's implicit `q_obj_NAME-arg` struct).
    Members(&'static [Member]),
    /// One named struct or union, as QEMU's `boxed` commands take it.
    Boxed(&'static Struct),
}

/// A QAPI enum.
#[derive(Debug)]
pub(super) struct Enum {
    pub(super) name: &'static str,
    pub(super) values: &'static [&'static str],
}

/// A QMP event and its `data` members.
#[derive(Debug)]
pub(super) struct Event {
    pub(super) name: &'static str,
    pub(super) data: &'static [Member],
}

/// A required member.
pub(super) const fn req(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

/// An optional member.
pub(super) const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

/// A plain struct.
pub(super) const fn obj(name: &'static str, members: &'static [Member]) -> Struct {
    Struct {
        name,
        members,
        variants: &[],
    }
}

/// The empty object, the return type of commands that answer `{}`.
pub(super) const EMPTY: Ty = Ty::Obj(&obj("q_empty", &[]));

/// The commands the QMP server itself answers (see [`ferry_qmp::SERVER_COMMANDS`]), with
/// their arguments and return types.
pub(super) const SERVER_COMMANDS: &[(&str, Params, Ty)] = &[
    (
        "qmp_capabilities",
        Params::Members(&[opt(
            "enable",
            Ty::List(&Ty::Enum(&Enum {
                name: "QMPCapability",
                values: &["oob"],
            })),
        )]),
        EMPTY,
    ),
    (
        "query-commands",
        Params::Members(&[]),
        Ty::List(&Ty::Obj(&obj("CommandInfo", &[req("name", Ty::Str)]))),
    ),
    (
        "query-version",
        Params::Members(&[]),
        Ty::Obj(&obj(
            "VersionInfo",
            &[
                req(
                    "qemu",
                    Ty::Obj(&obj(
                        "VersionTriple",
                        &[
                            req("major", Ty::Int),
                            req("minor", Ty::Int),
                            req("micro", Ty::Int),
                        ],
                    )),
                ),
                req("package", Ty::Str),
            ],
        )),
    ),
];

const DEVICE_EVENT: &[Member] = &[opt("device", Ty::Str), req("path", Ty::Str)];

/// Every event Ferry emits, with its data.
pub(super) const EVENTS: &[Event] = &[
    Event {
        name: "STOP",
        data: &[],
    },
    Event {
        name: "RESUME",
        data: &[],
    },
    Event {
        name: "SHUTDOWN",
        data: &[
            req("guest", Ty::Bool),
            req(
                "reason",
                Ty::Enum(&Enum {
                    name: "ShutdownCause",
                    values: &["host-qmp-quit"],
                }),
            ),
        ],
    },
    Event {
        name: "MIGRATION",
        data: &[req("status", Ty::Str)],
    },
    Event {
        name: "MIGRATION_PASS",
        data: &[req("pass", Ty::Int)],
    },
    Event {
        name: "DEVICE_DELETED",
        data: DEVICE_EVENT,
    },
    Event {
        name: "DEVICE_UNPLUG_GUEST_ERROR",
        data: DEVICE_EVENT,
    },
];

/// The name of the implicit argument struct of command `name`, as QEMU names it.
fn arg_type_name(name: &str) -> String {
    format!("q_obj_{name}-arg")
}

/// Builds `query-qmp-schema`'s answer: every command (`name`, arguments, return type), every
/// event, and every type they use, each once.
pub(super) fn qmp_schema<'a>(commands: impl Iterator<Item = (&'a str, Params, Ty)>) -> Value {
    let mut types = Types::default();
    let mut out = Vec::new();
    for (name, args, ret) in commands {
        out.push(json!({
            "name": name,
            "meta-type": "command",
            "arg-type": match args {
                Params::Members(m) => types.args(&arg_type_name(name), m),
                Params::Boxed(s) => types.name_of(Ty::Obj(s)),
            },
            "ret-type": types.name_of(ret),
            "allow-oob": false,
        }));
    }
    for e in EVENTS {
        out.push(json!({
            "name": e.name,
            "meta-type": "event",
            "arg-type": types.args(&format!("q_obj_{}-arg", e.name), e.data),
        }));
    }
    out.extend(types.0.into_values());
    Value::Array(out)
}

/// The types met so far, by name.
#[derive(Default)]
struct Types(BTreeMap<String, Value>);

impl Types {
    /// An argument struct (`q_empty` when there are none).
    fn args(&mut self, name: &str, members: &[Member]) -> String {
        if members.is_empty() {
            return self.name_of(EMPTY);
        }
        let v = self.object(members, &[]);
        self.0.insert(name.to_owned(), with_name(name, v));
        name.to_owned()
    }

    fn object(&mut self, members: &[Member], variants: &[(&str, &'static Struct)]) -> Value {
        let members: Vec<Value> = members.iter().map(|m| self.member(m)).collect();
        let mut v = json!({"meta-type": "object", "members": members});
        if !variants.is_empty() {
            let tag = v["members"][0]["name"].clone();
            v["tag"] = tag;
            let vs: Vec<Value> = variants
                .iter()
                .map(|(case, s)| json!({"case": case, "type": self.name_of(Ty::Obj(s))}))
                .collect();
            v["variants"] = Value::Array(vs);
        }
        v
    }

    fn member(&mut self, m: &Member) -> Value {
        let mut v = json!({"name": m.name, "type": self.name_of(m.ty)});
        if m.optional {
            v["default"] = Value::Null;
        }
        v
    }

    /// The schema name of `ty`, adding it (and what it uses) on first sight.
    fn name_of(&mut self, ty: Ty) -> String {
        let (name, json_type) = match ty {
            Ty::Str => ("str", "string"),
            Ty::Int => ("int", "int"),
            Ty::Bool => ("bool", "boolean"),
            Ty::Any => ("any", "value"),
            Ty::List(elem) => {
                let e = self.name_of(*elem);
                let name = format!("[{e}]");
                let v = json!({"meta-type": "array", "element-type": e});
                self.0.entry(name.clone()).or_insert(with_name(&name, v));
                return name;
            }
            Ty::Obj(s) => {
                if !self.0.contains_key(s.name) {
                    // Placeholder first: a struct may (indirectly) refer to itself.
                    self.0.insert(s.name.to_owned(), Value::Null);
                    let v = self.object(s.members, s.variants);
                    self.0.insert(s.name.to_owned(), with_name(s.name, v));
                }
                return s.name.to_owned();
            }
            Ty::Enum(e) => {
                let members: Vec<Value> = e.values.iter().map(|v| json!({"name": v})).collect();
                let v = json!({"meta-type": "enum", "values": e.values, "members": members});
                self.0
                    .entry(e.name.to_owned())
                    .or_insert(with_name(e.name, v));
                return e.name.to_owned();
            }
        };
        let v = json!({"meta-type": "builtin", "json-type": json_type});
        self.0.entry(name.to_owned()).or_insert(with_name(name, v));
        name.to_owned()
    }
}

fn with_name(name: &str, v: Value) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), json!(name));
    if let Value::Object(rest) = v {
        m.extend(rest);
    }
    Value::Object(m)
}

/// Refuses an argument (top level only) that is none of `members`, as QEMU words it.
pub(super) fn check_arg_names<'a>(
    members: impl Iterator<Item = &'a Member> + Clone,
    args: &Map<String, Value>,
) -> Result<(), ferry_qmp::QmpError> {
    match args
        .keys()
        .find(|k| !members.clone().any(|m| m.name == k.as_str()))
    {
        Some(k) => Err(ferry_qmp::QmpError::unexpected_parameter(k)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event name the sources emit is in [`EVENTS`], and every entry there is emitted:
    /// the schema's events cannot drift from the code.
    #[test]
    fn events_match_the_sources() {
        let mut emitted = std::collections::BTreeSet::new();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).expect("read src dir") {
                let p = e.expect("dir entry").path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&p).expect("read source");
                    for chunk in text.split("emit(").skip(1) {
                        let s = chunk.trim_start();
                        if let Some(rest) = s.strip_prefix('"') {
                            let name: String = rest.chars().take_while(|c| *c != '"').collect();
                            if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                                emitted.insert(name);
                            }
                        }
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            EVENTS.iter().map(|e| e.name.to_owned()).collect();
        assert_eq!(emitted, listed, "emitted events vs the schema's EVENTS");
    }

    #[test]
    fn server_commands_are_described() {
        let described: Vec<&str> = SERVER_COMMANDS.iter().map(|c| c.0).collect();
        assert_eq!(described, ferry_qmp::SERVER_COMMANDS.to_vec());
    }
}
