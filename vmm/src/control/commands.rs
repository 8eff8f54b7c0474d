//! The one table of QMP commands: `query-commands` lists it, `execute` dispatches through it
//! and `query-qmp-schema` describes it (arguments and return types declared here), so a
//! command cannot be advertised without a handler, handled without being advertised, or
//! take an argument the schema does not show.

use super::Controller;
use super::probe::Probe;
use super::schema::{EMPTY, Enum, Params, Struct, Ty, obj, opt, req};
use crate::qmp::{Args, QmpError};
use serde_json::{Map, Value, json};
use std::os::fd::OwnedFd;
use std::sync::Arc;

pub(super) type Arguments = Map<String, Value>;

/// A handler taking the descriptors passed with its command.
pub(super) type FdHandler =
    fn(&Arc<Controller>, Arguments, Vec<OwnedFd>) -> Result<Value, QmpError>;

/// How a command runs.
pub(super) enum Run {
    /// Needs the VM (refused by a `-machine none` probe process).
    Vm(fn(&Arc<Controller>, Arguments) -> Result<Value, QmpError>),
    /// Answers from Ferry's tables and this host alone (also in a probe process).
    Host(fn(&Probe, Arguments) -> Result<Value, QmpError>),
    /// Needs the VM and takes the descriptors passed with the command (`getfd`).
    Fds(FdHandler),
}

/// A QMP command: its wire name, arguments, return type and handler.
pub(super) struct Command {
    pub(super) name: &'static str,
    pub(super) args: Params,
    /// Takes properties beyond `args` (`device_add`, like QEMU's `gen: false`); the handler
    /// checks them.
    pub(super) open: bool,
    pub(super) ret: Ty,
    pub(super) run: Run,
}

impl Command {
    /// Refuses an argument the schema does not declare (before the handler sees any).
    pub(super) fn check_args(&self, a: &Arguments) -> Result<(), QmpError> {
        if self.open {
            return Ok(());
        }
        match self.args {
            Params::Members(m) => super::schema::check_arg_names(m.iter(), a),
            Params::Boxed(s) => super::schema::check_arg_names(
                s.members
                    .iter()
                    .chain(s.variants.iter().flat_map(|v| v.1.members)),
                a,
            ),
        }
    }
}

/// Refuse any argument (commands that take none).
fn no_args(a: Arguments) -> Result<(), QmpError> {
    Args::new(a).finish()
}

const STR_LIST: Ty = Ty::List(&Ty::Str);

const STATUS_INFO: Struct = obj(
    "StatusInfo",
    &[
        req("running", Ty::Bool),
        req("singlestep", Ty::Bool),
        req("status", Ty::Str),
    ],
);

const MACHINE_INFO: Struct = obj(
    "MachineInfo",
    &[
        req("name", Ty::Str),
        opt("alias", Ty::Str),
        opt("is-default", Ty::Bool),
        req("cpu-max", Ty::Int),
        req("hotpluggable-cpus", Ty::Bool),
        req("deprecated", Ty::Bool),
        opt("default-cpu-type", Ty::Str),
    ],
);

const CPU_DEFINITION_INFO: Struct = obj(
    "CpuDefinitionInfo",
    &[
        req("name", Ty::Str),
        opt("migration-safe", Ty::Bool),
        req("static", Ty::Bool),
        opt("unavailable-features", STR_LIST),
        req("typename", Ty::Str),
        req("deprecated", Ty::Bool),
    ],
);

const HOTPLUGGABLE_CPU: Struct = obj(
    "HotpluggableCPU",
    &[
        req("type", Ty::Str),
        req("vcpus-count", Ty::Int),
        req(
            "props",
            Ty::Obj(&obj("CpuInstanceProperties", &[opt("core-id", Ty::Int)])),
        ),
        opt("qom-path", Ty::Str),
    ],
);

const MIGRATION_CAPABILITY: Struct = obj(
    "MigrationCapabilityStatus",
    &[
        req(
            "capability",
            Ty::Enum(&Enum {
                name: "MigrationCapability",
                values: &["events", "auto-converge", "postcopy-ram", "return-path"],
            }),
        ),
        req("state", Ty::Bool),
    ],
);

const TLS_CREDS_X509: Struct = obj(
    "TlsCredsX509Properties",
    &[
        req("dir", Ty::Str),
        opt(
            "endpoint",
            Ty::Enum(&Enum {
                name: "QCryptoTLSCredsEndpoint",
                values: &["client", "server"],
            }),
        ),
        opt("verify-peer", Ty::Bool),
        opt("sanity-check", Ty::Bool),
    ],
);

const AUTHZ_POLICY: Ty = Ty::Enum(&Enum {
    name: "QAuthZListPolicy",
    values: &["allow", "deny"],
});

const AUTHZ_LIST: Struct = obj(
    "AuthZListProperties",
    &[
        opt("policy", AUTHZ_POLICY),
        opt(
            "rules",
            Ty::List(&Ty::Obj(&obj(
                "QAuthZListRule",
                &[
                    req("match", Ty::Str),
                    req("policy", AUTHZ_POLICY),
                    opt(
                        "format",
                        Ty::Enum(&Enum {
                            name: "QAuthZListFormat",
                            values: &["exact", "glob"],
                        }),
                    ),
                ],
            ))),
        ),
    ],
);

const OBJECT_OPTIONS: Struct = Struct {
    name: "ObjectOptions",
    members: &[
        req(
            "qom-type",
            Ty::Enum(&Enum {
                name: "ObjectType",
                values: &["tls-creds-x509", "authz-simple", "authz-list"],
            }),
        ),
        req("id", Ty::Str),
    ],
    variants: &[
        ("tls-creds-x509", &TLS_CREDS_X509),
        (
            "authz-simple",
            &obj("AuthZSimpleProperties", &[req("identity", Ty::Str)]),
        ),
        ("authz-list", &AUTHZ_LIST),
    ],
};

const OBJECT_PROPERTY_INFO: Struct = obj(
    "ObjectPropertyInfo",
    &[
        req("name", Ty::Str),
        req("type", Ty::Str),
        opt("description", Ty::Str),
    ],
);

const CPU_MODEL_INFO: Struct = obj(
    "CpuModelInfo",
    &[req("name", Ty::Str), opt("props", Ty::Any)],
);

const CPU_MODEL_EXPANSION_TYPE: Ty = Ty::Enum(&Enum {
    name: "CpuModelExpansionType",
    values: &["static", "full"],
});

/// Every command Ferry answers, in `query-commands` order.
pub(super) const COMMANDS: &[Command] = &[
    Command {
        name: "query-status",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Obj(&STATUS_INFO),
        run: Run::Vm(|c, a| {
            no_args(a)?;
            let s = c.run_state();
            Ok(json!({"running": s.is_running(), "singlestep": false, "status": s.as_str()}))
        }),
    },
    Command {
        name: "stop",
        args: Params::Members(&[]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.stop()
        }),
    },
    Command {
        name: "cont",
        args: Params::Members(&[]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.cont_inner()
        }),
    },
    Command {
        name: "quit",
        args: Params::Members(&[]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.quit()
        }),
    },
    Command {
        name: "query-machines",
        args: Params::Members(&[opt("compat-props", Ty::Bool)]),
        open: false,
        ret: Ty::List(&Ty::Obj(&MACHINE_INFO)),
        run: Run::Host(|p, a| {
            let mut a = Args::new(a);
            let _ = a.optional_bool("compat-props")?;
            a.finish()?;
            Ok(p.query_machines())
        }),
    },
    Command {
        name: "query-cpu-definitions",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::List(&Ty::Obj(&CPU_DEFINITION_INFO)),
        run: Run::Host(|p, a| {
            no_args(a)?;
            Ok(p.query_cpu_definitions())
        }),
    },
    Command {
        name: "query-cpu-model-expansion",
        args: Params::Members(&[
            req("type", CPU_MODEL_EXPANSION_TYPE),
            req("model", Ty::Obj(&CPU_MODEL_INFO)),
        ]),
        open: false,
        ret: Ty::Obj(&obj(
            "CpuModelExpansionInfo",
            &[req("model", Ty::Obj(&CPU_MODEL_INFO))],
        )),
        run: Run::Host(|p, a| p.query_cpu_model_expansion(a)),
    },
    Command {
        name: "query-hotpluggable-cpus",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::List(&Ty::Obj(&HOTPLUGGABLE_CPU)),
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_hotpluggable_cpus())
        }),
    },
    Command {
        name: "migrate",
        args: Params::Members(&[
            opt("uri", Ty::Str),
            opt("detach", Ty::Bool),
            opt("blk", Ty::Bool),
            opt("inc", Ty::Bool),
            opt("resume", Ty::Bool),
            opt("channels", Ty::Any),
        ]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.migrate(a)),
    },
    Command {
        name: "migrate-incoming",
        args: Params::Members(&[opt("uri", Ty::Str), opt("exit-on-error", Ty::Bool)]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.migrate_incoming(a)),
    },
    Command {
        name: "migrate_cancel",
        args: Params::Members(&[]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.migrate_cancel()
        }),
    },
    Command {
        name: "migrate-recover",
        args: Params::Members(&[req("uri", Ty::Str)]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.migrate_recover(a)),
    },
    Command {
        name: "migrate-start-postcopy",
        args: Params::Members(&[]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.start_postcopy()
        }),
    },
    Command {
        name: "query-migrate",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_migrate())
        }),
    },
    Command {
        name: "migrate-set-capabilities",
        args: Params::Members(&[req(
            "capabilities",
            Ty::List(&Ty::Obj(&MIGRATION_CAPABILITY)),
        )]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.set_capabilities(a)),
    },
    Command {
        name: "query-migrate-capabilities",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::List(&Ty::Obj(&MIGRATION_CAPABILITY)),
        run: Run::Host(|p, a| {
            no_args(a)?;
            Ok(p.query_migrate_capabilities())
        }),
    },
    Command {
        name: "object-add",
        args: Params::Boxed(&OBJECT_OPTIONS),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.object_add(a)),
    },
    Command {
        name: "object-del",
        args: Params::Members(&[req("id", Ty::Str)]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.object_del(a)),
    },
    Command {
        name: "__org.ferry_query-objects",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_objects())
        }),
    },
    Command {
        name: "migrate-set-parameters",
        args: Params::Members(&[
            opt("downtime-limit", Ty::Int),
            opt("max-bandwidth", Ty::Int),
            opt("__org.ferry_max-iterations", Ty::Int),
            opt(
                "__org.ferry_switchover-policy",
                Ty::Enum(&Enum {
                    name: "__org.ferry_SwitchoverPolicy",
                    values: &["cancel", "force"],
                }),
            ),
            opt("__org.ferry_io-timeout", Ty::Int),
            opt("__org.ferry_sparse-pages", Ty::Bool),
            opt("multifd-channels", Ty::Int),
            opt("tls-creds", Ty::Any),
            opt("tls-hostname", Ty::Any),
            opt("tls-authz", Ty::Any),
            opt("cpu-throttle-initial", Ty::Int),
            opt("cpu-throttle-increment", Ty::Int),
            opt("cpu-throttle-tailslow", Ty::Bool),
            opt("max-cpu-throttle", Ty::Int),
            opt("throttle-trigger-threshold", Ty::Int),
            opt("__org.ferry_downtime-step", Ty::Int),
            opt("__org.ferry_downtime-ceiling", Ty::Int),
            opt("__org.ferry_stall-passes", Ty::Int),
            opt("__org.ferry_stall-timeout", Ty::Int),
            opt("max-postcopy-bandwidth", Ty::Int),
            opt("__org.ferry_page-thread-nice", Ty::Int),
        ]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.set_parameters(a)),
    },
    Command {
        name: "query-migrate-parameters",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_parameters())
        }),
    },
    Command {
        name: "__org.ferry_query-guest",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Obj(&obj(
            "__org.ferry_GuestInfo",
            &[
                req("pass", Ty::Int),
                req("page", Ty::Int),
                req("working-set-pages", Ty::Int),
            ],
        )),
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.query_guest()
        }),
    },
    Command {
        name: "__org.ferry_verify-guest",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.verify_guest()
        }),
    },
    Command {
        name: "device_add",
        args: Params::Members(&[
            req("driver", Ty::Str),
            opt("id", Ty::Str),
            opt("bus", Ty::Str),
            opt("core-id", Ty::Int),
            opt("slot", Ty::Int),
            opt("addr", Ty::Str),
            opt("multifunction", Ty::Any),
        ]),
        open: true,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.device_add(a)),
    },
    Command {
        name: "device_del",
        args: Params::Members(&[req("id", Ty::Str)]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.device_del(a)),
    },
    Command {
        name: "__org.ferry_query-connectors",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_connectors())
        }),
    },
    Command {
        name: "__org.ferry_guest-hotplug",
        args: Params::Members(&[
            opt(
                "mode",
                Ty::Enum(&Enum {
                    name: "__org.ferry_GuestHotplugMode",
                    values: &["cooperative", "refuse", "ignore", "slow"],
                }),
            ),
            opt("answer", Ty::Bool),
        ]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.guest_hotplug(a)),
    },
    Command {
        name: "query-name",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Obj(&obj("NameInfo", &[opt("name", Ty::Str)])),
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_name())
        }),
    },
    Command {
        name: "query-uuid",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Obj(&obj("UuidInfo", &[req("UUID", Ty::Str)])),
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_uuid())
        }),
    },
    Command {
        name: "query-chardev",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::List(&Ty::Obj(&obj(
            "ChardevInfo",
            &[
                req("label", Ty::Str),
                req("filename", Ty::Str),
                req("frontend-open", Ty::Bool),
            ],
        ))),
        run: Run::Vm(|c, a| {
            no_args(a)?;
            Ok(c.query_chardev())
        }),
    },
    Command {
        name: "query-cpus-fast",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::List(&Ty::Obj(&obj(
            "CpuInfoFast",
            &[
                req("cpu-index", Ty::Int),
                req("qom-path", Ty::Str),
                req("thread-id", Ty::Int),
                opt(
                    "props",
                    Ty::Obj(&obj("CpuInstanceProperties", &[opt("core-id", Ty::Int)])),
                ),
                req("target", Ty::Str),
            ],
        ))),
        run: Run::Vm(|c, a| {
            no_args(a)?;
            c.query_cpus_fast()
        }),
    },
    Command {
        name: "query-named-block-nodes",
        args: Params::Members(&[opt("flat", Ty::Bool)]),
        open: false,
        ret: Ty::List(&Ty::Any),
        run: Run::Host(|_, a| {
            let mut a = Args::new(a);
            let _ = a.optional_bool("flat")?;
            a.finish()?;
            // Ferry has no block devices.
            Ok(json!([]))
        }),
    },
    Command {
        name: "query-block",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::List(&Ty::Any),
        run: Run::Host(|_, a| {
            no_args(a)?;
            // Ferry has no block devices.
            Ok(json!([]))
        }),
    },
    Command {
        name: "getfd",
        args: Params::Members(&[req("fdname", Ty::Str)]),
        open: false,
        ret: EMPTY,
        run: Run::Fds(|c, a, fds| c.getfd(a, fds)),
    },
    Command {
        name: "closefd",
        args: Params::Members(&[req("fdname", Ty::Str)]),
        open: false,
        ret: EMPTY,
        run: Run::Vm(|c, a| c.closefd(a)),
    },
    Command {
        name: "query-jobs",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::List(&Ty::Any),
        run: Run::Host(|_, a| {
            no_args(a)?;
            // Ferry has no block jobs (migrations are followed with query-migrate).
            Ok(json!([]))
        }),
    },
    Command {
        name: "qom-list",
        args: Params::Members(&[req("path", Ty::Str)]),
        open: false,
        ret: Ty::List(&Ty::Obj(&OBJECT_PROPERTY_INFO)),
        run: Run::Vm(|c, a| c.qom_list(a)),
    },
    Command {
        name: "query-qmp-schema",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Host(|_, a| {
            no_args(a)?;
            Ok(schema())
        }),
    },
    Command {
        name: "query-target",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Obj(&obj("TargetInfo", &[req("arch", Ty::Str)])),
        run: Run::Host(|_, a| {
            no_args(a)?;
            Ok(json!({"arch": "x86_64"}))
        }),
    },
    Command {
        name: "query-kvm",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Obj(&obj(
            "KvmInfo",
            &[req("enabled", Ty::Bool), req("present", Ty::Bool)],
        )),
        run: Run::Host(|p, a| {
            no_args(a)?;
            Ok(p.query_kvm())
        }),
    },
    Command {
        name: "query-command-line-options",
        args: Params::Members(&[opt("option", Ty::Str)]),
        open: false,
        ret: Ty::List(&Ty::Obj(&obj(
            "CommandLineOptionInfo",
            &[
                req("option", Ty::Str),
                req(
                    "parameters",
                    Ty::List(&Ty::Obj(&obj(
                        "CommandLineParameterInfo",
                        &[
                            req("name", Ty::Str),
                            req(
                                "type",
                                Ty::Enum(&Enum {
                                    name: "CommandLineParameterType",
                                    values: &["string", "boolean", "number", "size"],
                                }),
                            ),
                            opt("help", Ty::Str),
                        ],
                    ))),
                ),
            ],
        ))),
        run: Run::Host(|_, a| super::probe::query_command_line_options(a)),
    },
    Command {
        name: "qom-list-types",
        args: Params::Members(&[opt("implements", Ty::Str), opt("abstract", Ty::Bool)]),
        open: false,
        ret: Ty::List(&Ty::Obj(&obj(
            "ObjectTypeInfo",
            &[
                req("name", Ty::Str),
                opt("abstract", Ty::Bool),
                opt("parent", Ty::Str),
            ],
        ))),
        run: Run::Host(|p, a| p.qom_list_types(a)),
    },
    Command {
        name: "qom-list-properties",
        args: Params::Members(&[req("typename", Ty::Str)]),
        open: false,
        ret: Ty::List(&Ty::Obj(&OBJECT_PROPERTY_INFO)),
        run: Run::Host(|p, a| p.list_properties(a, false)),
    },
    Command {
        name: "device-list-properties",
        args: Params::Members(&[req("typename", Ty::Str)]),
        open: false,
        ret: Ty::List(&Ty::Obj(&OBJECT_PROPERTY_INFO)),
        run: Run::Host(|p, a| p.list_properties(a, true)),
    },
    Command {
        name: "query-tpm-types",
        args: Params::Members(&[]),
        open: false,
        ret: STR_LIST,
        run: Run::Host(|_, a| {
            no_args(a)?;
            // Ferry has no TPM backends.
            Ok(json!([]))
        }),
    },
    Command {
        name: "query-tpm-models",
        args: Params::Members(&[]),
        open: false,
        ret: STR_LIST,
        run: Run::Host(|_, a| {
            no_args(a)?;
            // Ferry has no TPM devices.
            Ok(json!([]))
        }),
    },
    Command {
        name: "query-sev-capabilities",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Host(|_, a| {
            no_args(a)?;
            // As QEMU answers on a host whose KVM has no SEV: Ferry never offers it.
            Err(QmpError::generic("SEV is not enabled in KVM"))
        }),
    },
    Command {
        name: "query-sgx-capabilities",
        args: Params::Members(&[]),
        open: false,
        ret: Ty::Any,
        run: Run::Host(|_, a| {
            no_args(a)?;
            Err(QmpError::generic("SGX is not enabled in KVM"))
        }),
    },
];

/// Looks a command up by name.
pub(super) fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// `query-qmp-schema`: the server's commands, this table, and the events.
pub(super) fn schema() -> Value {
    let server = super::schema::SERVER_COMMANDS
        .iter()
        .map(|(n, a, r)| (*n, *a, *r));
    let table = COMMANDS.iter().map(|c| (c.name, c.args, c.ret));
    super::schema::qmp_schema(server.chain(table))
}

#[cfg(test)]
mod tests {
    use super::COMMANDS;
    use std::collections::BTreeSet;

    #[test]
    fn command_names_are_unique() {
        let names: BTreeSet<_> = COMMANDS.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), COMMANDS.len(), "a command is listed twice");
    }

    #[test]
    fn every_referenced_type_is_defined() {
        let schema = super::schema();
        let entries = schema.as_array().expect("an array");
        let names: BTreeSet<&str> = entries.iter().filter_map(|e| e["name"].as_str()).collect();
        assert_eq!(names.len(), entries.len(), "a schema name is defined twice");
        for e in entries {
            let mut refs: Vec<&str> = ["arg-type", "ret-type", "element-type"]
                .iter()
                .filter_map(|k| e[*k].as_str())
                .collect();
            for m in e["members"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(e["variants"].as_array().into_iter().flatten())
            {
                refs.extend(m["type"].as_str());
            }
            for r in refs {
                assert!(names.contains(r), "'{r}' is referenced but not defined");
            }
        }
    }

    #[test]
    fn every_command_and_event_is_in_the_schema() {
        let schema = super::schema();
        let of = |meta: &str| -> BTreeSet<String> {
            schema
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["meta-type"] == meta)
                .filter_map(|e| e["name"].as_str().map(str::to_owned))
                .collect()
        };
        let mut commands: BTreeSet<String> = COMMANDS.iter().map(|c| c.name.to_owned()).collect();
        commands.extend(ferry_qmp::SERVER_COMMANDS.iter().map(|s| s.to_string()));
        assert_eq!(of("command"), commands);
        let events: BTreeSet<String> = super::super::schema::EVENTS
            .iter()
            .map(|e| e.name.to_owned())
            .collect();
        assert_eq!(of("event"), events);
    }
}
