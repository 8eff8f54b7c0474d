//! Typed extraction of command arguments, with QEMU's error texts.
//!
//! A backend takes every member it knows, then calls [`Args::finish`] (or
//! [`Args::into_rest`] for open-ended commands such as `device_add`) before
//! doing anything. Errors therefore come in QEMU's order (members in the
//! order they are taken, then unknown members) and always before any side
//! effect. `null` counts as present and has the wrong type, as in QEMU.
//!
//! ```
//! # use ferry_qmp::{Args, QmpError};
//! # use serde_json::json;
//! fn device_del(args: serde_json::Map<String, serde_json::Value>) -> Result<String, QmpError> {
//!     let mut args = Args::new(args);
//!     let id = args.required_str("id")?;
//!     args.finish()?;
//!     Ok(id)
//! }
//! let err = device_del(json!({"id": 1}).as_object().unwrap().clone()).unwrap_err();
//! assert_eq!(err.desc, "Invalid parameter type for 'id', expected: string");
//! ```

use serde_json::{Map, Value};

use super::error::QmpError;

/// Arguments of one command, consumed member by member.
#[derive(Debug, Clone, Default)]
pub struct Args {
    map: Map<String, Value>,
    /// Prefix of member names in error messages, e.g. `capabilities[0]`.
    prefix: Option<String>,
}

impl Args {
    pub fn new(map: Map<String, Value>) -> Self {
        Self { map, prefix: None }
    }

    /// Arguments of a nested struct; errors name members `PREFIX.member`
    /// (QEMU's `full_name`, e.g. `capabilities[0].state`).
    pub fn nested(map: Map<String, Value>, prefix: impl Into<String>) -> Self {
        Self {
            map,
            prefix: Some(prefix.into()),
        }
    }

    /// The name of `member` as errors show it.
    pub fn full_name(&self, member: &str) -> String {
        match &self.prefix {
            Some(p) => format!("{p}.{member}"),
            None => member.to_owned(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn take<T>(
        &mut self,
        name: &str,
        expected: &str,
        conv: impl FnOnce(Value) -> Option<T>,
    ) -> Result<Option<T>, QmpError> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| QmpError::invalid_parameter_type(&self.full_name(name), expected)),
        }
    }

    fn require<T>(&self, name: &str, v: Option<T>) -> Result<T, QmpError> {
        v.ok_or_else(|| QmpError::missing_parameter(&self.full_name(name)))
    }

    pub fn optional_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        self.take(name, "string", |v| match v {
            Value::String(s) => Some(s),
            _ => None,
        })
    }

    pub fn required_str(&mut self, name: &str) -> Result<String, QmpError> {
        let v = self.optional_str(name)?;
        self.require(name, v)
    }

    pub fn optional_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        self.take(name, "boolean", |v| v.as_bool())
    }

    pub fn required_bool(&mut self, name: &str) -> Result<bool, QmpError> {
        let v = self.optional_bool(name)?;
        self.require(name, v)
    }

    /// A qdev boolean property (`device_add`): a JSON boolean, or a string
    /// QEMU's `qapi_bool_parse` takes (`on`/`off`, `yes`/`no`, `true`/`false`),
    /// which is how QEMU users write `"multifunction": "on"`.
    pub fn optional_qdev_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        let full = self.full_name(name);
        match self.map.remove(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" => Ok(Some(true)),
                "off" | "no" | "false" => Ok(Some(false)),
                _ => Err(QmpError::parameter_expects(&full, "'on' or 'off'")),
            },
            Some(_) => Err(QmpError::invalid_parameter_type(&full, "boolean")),
        }
    }

    /// A QAPI `int` (int64): "expected: integer" on anything else.
    pub fn optional_i64(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        self.take(name, "integer", |v| v.as_i64())
    }

    pub fn required_i64(&mut self, name: &str) -> Result<i64, QmpError> {
        let v = self.optional_i64(name)?;
        self.require(name, v)
    }

    /// A QAPI `uint64`/`size`: "Parameter 'x' expects uint64" on anything
    /// that is not a non-negative integer. (QEMU also wraps negative
    /// integers around; we refuse them.)
    pub fn optional_u64(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        match self.map.remove(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| QmpError::parameter_expects(&self.full_name(name), "uint64")),
        }
    }

    pub fn required_u64(&mut self, name: &str) -> Result<u64, QmpError> {
        let v = self.optional_u64(name)?;
        self.require(name, v)
    }

    /// A QAPI `number`: any JSON number.
    pub fn optional_f64(&mut self, name: &str) -> Result<Option<f64>, QmpError> {
        self.take(name, "number", |v| v.as_f64())
    }

    pub fn optional_array(&mut self, name: &str) -> Result<Option<Vec<Value>>, QmpError> {
        self.take(name, "array", |v| match v {
            Value::Array(a) => Some(a),
            _ => None,
        })
    }

    pub fn required_array(&mut self, name: &str) -> Result<Vec<Value>, QmpError> {
        let v = self.optional_array(name)?;
        self.require(name, v)
    }

    pub fn optional_object(&mut self, name: &str) -> Result<Option<Map<String, Value>>, QmpError> {
        self.take(name, "object", |v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
    }

    pub fn required_object(&mut self, name: &str) -> Result<Map<String, Value>, QmpError> {
        let v = self.optional_object(name)?;
        self.require(name, v)
    }

    /// A member of any type (alternates such as `StrOrNull`).
    pub fn optional_value(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name)
    }

    pub fn required_value(&mut self, name: &str) -> Result<Value, QmpError> {
        let v = self.optional_value(name);
        self.require(name, v)
    }

    /// A QAPI enum: a string among `allowed`, else
    /// "Parameter 'x' does not accept value 'v'".
    pub fn optional_enum(
        &mut self,
        name: &str,
        allowed: &[&str],
    ) -> Result<Option<String>, QmpError> {
        match self.optional_str(name)? {
            Some(s) if !allowed.contains(&s.as_str()) => {
                Err(QmpError::invalid_enum_value(&self.full_name(name), &s))
            }
            v => Ok(v),
        }
    }

    pub fn required_enum(&mut self, name: &str, allowed: &[&str]) -> Result<String, QmpError> {
        let v = self.optional_enum(name, allowed)?;
        self.require(name, v)
    }

    /// Succeeds only if every member was taken; otherwise
    /// "Parameter 'x' is unexpected" for the first member left.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(k) => Err(QmpError::unexpected_parameter(&self.full_name(k))),
            None => Ok(()),
        }
    }

    /// The members not taken, for commands with open-ended properties.
    pub fn into_rest(self) -> Map<String, Value> {
        self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        Args::new(v.as_object().unwrap().clone())
    }

    #[test]
    fn extraction_and_qemu_texts() {
        let mut a = args(json!({"s": "x", "b": true, "i": -3, "u": 7, "e": "on", "n": null}));
        assert_eq!(a.required_str("s").unwrap(), "x");
        assert!(a.required_bool("b").unwrap());
        assert_eq!(a.required_i64("i").unwrap(), -3);
        assert_eq!(a.optional_u64("u").unwrap(), Some(7));
        assert_eq!(a.optional_u64("absent").unwrap(), None);
        assert_eq!(a.required_enum("e", &["on", "off"]).unwrap(), "on");
        assert_eq!(
            a.optional_str("n").unwrap_err().desc,
            "Invalid parameter type for 'n', expected: string"
        );
        a.finish().unwrap();

        let mut a = args(json!({"x": 1, "i": "1", "u": -1, "e": "bogus"}));
        assert_eq!(
            a.required_str("id").unwrap_err().desc,
            "Parameter 'id' is missing"
        );
        assert_eq!(
            a.required_i64("i").unwrap_err().desc,
            "Invalid parameter type for 'i', expected: integer"
        );
        assert_eq!(
            a.required_u64("u").unwrap_err().desc,
            "Parameter 'u' expects uint64"
        );
        assert_eq!(
            a.required_enum("e", &["on"]).unwrap_err().desc,
            "Parameter 'e' does not accept value 'bogus'"
        );
        assert_eq!(a.finish().unwrap_err().desc, "Parameter 'x' is unexpected");

        let mut a = Args::nested(json!({"state": 1}).as_object().unwrap().clone(), "caps[0]");
        assert_eq!(
            a.required_bool("state").unwrap_err().desc,
            "Invalid parameter type for 'caps[0].state', expected: boolean"
        );
    }

    /// `device_add`'s qdev booleans: QEMU's string spellings and JSON booleans.
    #[test]
    fn qdev_bool_takes_qemu_spellings() {
        let mut a = args(json!({
            "a": "on", "b": "off", "c": "yes", "d": "no",
            "e": "true", "f": "false", "g": true, "h": false,
        }));
        for (name, want) in [
            ("a", true),
            ("b", false),
            ("c", true),
            ("d", false),
            ("e", true),
            ("f", false),
            ("g", true),
            ("h", false),
        ] {
            assert_eq!(a.optional_qdev_bool(name).unwrap(), Some(want), "{name}");
        }
        assert_eq!(a.optional_qdev_bool("absent").unwrap(), None);
        a.finish().unwrap();
        let mut a = args(json!({"m": "On", "n": 1, "o": null}));
        assert_eq!(
            a.optional_qdev_bool("m").unwrap_err().desc,
            "Parameter 'm' expects 'on' or 'off'"
        );
        for name in ["n", "o"] {
            assert_eq!(
                a.optional_qdev_bool(name).unwrap_err().desc,
                format!("Invalid parameter type for '{name}', expected: boolean")
            );
        }
    }
}
