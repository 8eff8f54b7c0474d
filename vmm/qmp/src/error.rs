//! Error types: the QMP error object sent to clients, and server setup errors.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `QapiErrorClass` from QEMU's `qapi/error.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// The default class for almost every error.
    GenericError,
    /// Unknown command, and the capabilities-negotiation states.
    CommandNotFound,
    /// `device_del` (and friends) of an unknown device id.
    DeviceNotFound,
    /// Balloon / block-job corners.
    DeviceNotActive,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The wire name of the class.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: serialized as `{"class": ..., "desc": ...}` inside `"error"`.
///
/// Backends return this from [`QmpBackend::execute`](super::QmpBackend::execute);
/// the constructors below produce QEMU 7.2's exact texts for the common cases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// `GenericError` with the given text.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound` with the given text.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// `DeviceNotFound`: "Device 'ID' not found".
    pub fn device_not_found(id: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{id}' not found"),
        )
    }

    /// "The command NAME has not been found".
    pub fn unknown_command(name: &str) -> Self {
        Self::command_not_found(format!("The command {name} has not been found"))
    }

    /// "Parameter 'NAME' is missing".
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// "Parameter 'NAME' is unexpected".
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// "Invalid parameter type for 'NAME', expected: TYPE" (TYPE is one of
    /// `string`, `integer`, `boolean`, `number`, `object`, `array`).
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// "Parameter 'NAME' expects WHAT" (QEMU's `QERR_INVALID_PARAMETER_VALUE`).
    pub fn parameter_expects(name: &str, what: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {what}"))
    }

    /// "Parameter 'NAME' does not accept value 'VALUE'" (bad enum value).
    pub fn invalid_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }
}

/// Errors setting up or running the listening socket.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is in use by a live QMP server")]
    AddrInUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
}
