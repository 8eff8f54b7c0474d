//! `query-qmp-schema` against the handlers of a real `ferry run`: every argument the schema
//! declares is one the command takes (the dispatcher already refuses every argument the
//! schema does not declare, so the two cannot drift either way).

use ferry_tests::{Ferry, require_kvm, tempdir};
use serde_json::{Map, Value, json};

/// A value of the wrong JSON type for schema type `ty`, or `None` for `any`.
fn wrong_value(schema: &[Value], ty: &str) -> Option<Value> {
    let meta = schema
        .iter()
        .find(|e| e["name"] == ty)
        .unwrap_or_else(|| panic!("type {ty} is not in the schema"));
    match (meta["meta-type"].as_str(), meta["json-type"].as_str()) {
        (Some("builtin"), Some("value")) => None,
        (Some("builtin"), Some("string")) | (Some("enum"), _) => Some(json!(12345)),
        _ => Some(json!("not-this-type")),
    }
}

/// A value of the right JSON type for schema type `ty`.
fn right_value(schema: &[Value], ty: &str) -> Value {
    let meta = schema
        .iter()
        .find(|e| e["name"] == ty)
        .unwrap_or_else(|| panic!("type {ty} is not in the schema"));
    match (meta["meta-type"].as_str(), meta["json-type"].as_str()) {
        (Some("builtin"), Some("string")) => json!("schema-check"),
        (Some("builtin"), Some("int")) => json!(0),
        (Some("builtin"), Some("boolean")) => json!(false),
        (Some("enum"), _) => meta["values"][0].clone(),
        (Some("array"), _) => json!([]),
        _ => json!({}),
    }
}

/// The members of object type `name`, with the tag value that selects each variant's.
fn members(schema: &[Value], name: &str) -> Vec<(Value, Option<(String, String)>)> {
    let t = schema
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("type {name} is not in the schema"));
    let mut out: Vec<_> = t["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m.clone(), None))
        .collect();
    let tag = t["tag"].as_str().unwrap_or_default();
    for v in t["variants"].as_array().into_iter().flatten() {
        let case = v["case"].as_str().expect("case").to_owned();
        for (m, _) in members(schema, v["type"].as_str().expect("variant type")) {
            out.push((m, Some((tag.to_owned(), case.clone()))));
        }
    }
    out
}

#[test]
fn every_declared_argument_is_taken_by_its_command() {
    require_kvm();
    let dir = tempdir();
    let mut f = Ferry::spawn(
        dir.path(),
        "vm",
        &["--memory", "64M", "--guest", "idle", "-S"],
    );
    let schema = f.ok("query-qmp-schema", json!({}));
    let schema = schema.as_array().expect("schema is a list").clone();
    let mut checked = 0;
    for cmd in schema.iter().filter(|e| e["meta-type"] == "command") {
        let name = cmd["name"].as_str().expect("command name");
        for (m, variant) in members(&schema, cmd["arg-type"].as_str().expect("arg-type")) {
            let member = m["name"].as_str().expect("member name");
            let Some(bad) = wrong_value(&schema, m["type"].as_str().expect("member type")) else {
                continue;
            };
            // The other required members (of the base, and of this member's variant) valid,
            // so the handler gets as far as this member.
            let mut args = Map::new();
            for (other, v) in members(&schema, cmd["arg-type"].as_str().expect("arg-type")) {
                let in_scope = v.is_none() || v == variant;
                if in_scope && !other.as_object().expect("member").contains_key("default") {
                    let ty = other["type"].as_str().expect("member type");
                    let n = other["name"].as_str().expect("member name");
                    args.insert(n.to_owned(), right_value(&schema, ty));
                }
            }
            if let Some((tag, case)) = &variant {
                args.insert(tag.clone(), json!(case));
            }
            args.insert(member.to_owned(), bad);
            let desc = f.err(name, Value::Object(args.clone()));
            assert!(
                !desc.contains(&format!("'{member}' is unexpected"))
                    && !desc.contains(&format!(".{member}' not found")),
                "{name} {args:?}: the schema declares '{member}' but the command refuses it: {desc}"
            );
            checked += 1;
        }
    }
    assert!(checked > 30, "only {checked} arguments checked");
}
