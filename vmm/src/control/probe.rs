//! What Ferry answers without a VM: machine types, CPU models and their expansion, QOM
//! types and properties, command-line options. A VM process answers these through its
//! [`Controller`](super::Controller); a `-machine none` process (libvirt's capability probe)
//! through [`ProbeBackend`], which refuses the commands that need a VM.

use super::commands::{self, Arguments, Run};
use crate::qmp::{Args, ErrorClass, QmpBackend, QmpError, ShutdownHandle};
use crate::vcpu::cpuid;
use machine_types::CpuModel;
use machine_types::cpu::{CpuidLeaf, FEATURES, Feature};
use serde_json::{Map, Value, json};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};

/// Reading what this host's KVM offers failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("Cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("Cannot read KVM's supported CPUID")]
    Cpuid(#[source] kvm_ioctls::Error),
}

/// Ferry's tables and this host's KVM, as the probe commands report them.
#[derive(Debug)]
pub struct Probe {
    /// What each CPU model lacks on this host.
    cpu_unavailable: Vec<(CpuModel, Vec<String>)>,
    /// KVM's supported CPUID, which the legacy models mask (or why it could not be read).
    kvm_cpuid: Result<Vec<CpuidLeaf>, String>,
    /// The migration capability `events` (shared with the controller).
    pub(super) events_cap: Arc<AtomicBool>,
    /// The migration capability `return-path`: on by default, as Ferry's TCP migration
    /// always has one; off refuses TCP migrations (file and fd streams have none).
    pub(super) return_path: Arc<AtomicBool>,
    /// Migration parameters, `auto-converge` and `postcopy-ram` among them (shared with the
    /// controller).
    pub(super) params: Arc<std::sync::Mutex<migration::Params>>,
}

impl Probe {
    /// Reads this host's KVM, as a VM of this host would see it.
    pub fn for_host() -> Result<Probe, ProbeError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(ProbeError::Kvm)?;
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ProbeError::Cpuid)?;
        let kvm_cpuid = cpuid::leaves_from_kvm(&supported);
        let (host, msrs) = cpuid::host_support_of(&kvm).map_err(ProbeError::Cpuid)?;
        let cpu_unavailable = machine_types::cpu::ALL_MODELS
            .iter()
            .map(|&m| (m, m.host_lacks(&host, &msrs)))
            .collect();
        Ok(Probe {
            cpu_unavailable,
            kvm_cpuid: Ok(kvm_cpuid),
            events_cap: Arc::new(AtomicBool::new(false)),
            return_path: Arc::new(AtomicBool::new(true)),
            params: Arc::default(),
        })
    }

    /// What `vm`'s host offers (its hidden features absent), sharing the controller's
    /// `events` capability flag.
    pub(super) fn for_vm(
        vm: &crate::Vm,
        events_cap: Arc<AtomicBool>,
        params: Arc<std::sync::Mutex<migration::Params>>,
    ) -> Probe {
        let kvm_cpuid = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map(|c| {
                let mut l = cpuid::leaves_from_kvm(&c);
                machine_types::cpu::hide_features(&mut l, &vm.config().hidden_host_features);
                l
            })
            .map_err(|e| e.to_string());
        Probe {
            cpu_unavailable: machine_types::cpu::ALL_MODELS
                .iter()
                .map(|&m| (m, vm.host_lacks(m)))
                .collect(),
            kvm_cpuid,
            events_cap,
            return_path: Arc::new(AtomicBool::new(true)),
            params,
        }
    }

    /// `query-migrate-capabilities`: every capability Ferry has.
    pub(super) fn query_migrate_capabilities(&self) -> serde_json::Value {
        let p = self.params.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!([
            {"capability": "events", "state": self.events_cap.load(std::sync::atomic::Ordering::SeqCst)},
            {"capability": "auto-converge", "state": p.converge.auto_converge},
            {"capability": "postcopy-ram", "state": p.postcopy},
            {"capability": "return-path", "state": self.return_path.load(std::sync::atomic::Ordering::SeqCst)},
        ])
    }

    /// The guest CPUID of `model` on this host: its fixed table, or for a legacy model KVM's
    /// supported CPUID masked.
    pub fn model_cpuid(&self, model: CpuModel) -> Result<Vec<CpuidLeaf>, String> {
        if let Some(t) = model.fixed_cpuid() {
            return Ok(t);
        }
        let kvm = self
            .kvm_cpuid
            .as_ref()
            .map_err(|e| format!("cannot read KVM's supported CPUID: {e}"))?;
        cpuid::base_cpuid(model, kvm)
            .map(|c| cpuid::leaves_from_kvm(&c))
            .map_err(|e| e.to_string())
    }

    /// `query-machines`: every machine type, with its default CPU model.
    pub(super) fn query_machines(&self) -> Value {
        let list: Vec<Value> = machine_types::all()
            .iter()
            .map(|m| {
                let mut v = json!({
                    "name": m.name(),
                    "cpu-max": 255,
                    "hotpluggable-cpus": true,
                    "deprecated": false,
                    "is-default": m.is_newest(),
                    "default-cpu-type": cpu_typename(m.compat().cpu_model),
                });
                if m.is_newest() {
                    v["alias"] = json!(machine_types::ALIAS_NEWEST);
                }
                v
            })
            .collect();
        Value::Array(list)
    }

    /// Every CPU model as QEMU lists them: named models are migration-safe (a fixed table),
    /// the legacy host-masked ones are not; `unavailable-features` is what this host lacks.
    pub(super) fn query_cpu_definitions(&self) -> Value {
        let list: Vec<Value> = self
            .cpu_unavailable
            .iter()
            .map(|(m, lacks)| {
                json!({
                    "name": m.name(),
                    "typename": cpu_typename(*m),
                    "unavailable-features": lacks,
                    "static": false,
                    "migration-safe": m.is_fixed(),
                    "deprecated": false,
                })
            })
            .collect();
        Value::Array(list)
    }

    /// `query-kvm`: Ferry runs on KVM only, and this process has opened it.
    pub(super) fn query_kvm(&self) -> Value {
        json!({"enabled": true, "present": true})
    }

    /// `query-cpu-model-expansion` of type `full`: the model's name and every CPUID feature
    /// Ferry knows by name, on or off. Ferry's models take no feature changes, so a `props`
    /// entry may only repeat the model's own value.
    pub(super) fn query_cpu_model_expansion(&self, a: Arguments) -> Result<Value, QmpError> {
        let mut a = Args::new(a);
        let ty = a.required_enum("type", &["static", "full"])?;
        let mut model = Args::nested(a.required_object("model")?, "model");
        a.finish()?;
        let name = model.required_str("name")?;
        let props = model.optional_object("props")?.unwrap_or_default();
        model.finish()?;
        let Some(cpu) = CpuModel::by_name(&name) else {
            return Err(QmpError::generic(format!("CPU model '{name}' not found")));
        };
        if ty == "static" {
            return Err(QmpError::generic(
                "Ferry has no static CPU models; use expansion type 'full'",
            ));
        }
        let table = self
            .model_cpuid(cpu)
            .map_err(|e| QmpError::generic(format!("Cannot build the CPUID of {name}: {e}")))?;
        let mut out = Map::new();
        for f in FEATURES {
            out.insert(f.name.to_owned(), json!(has_feature(&table, f)));
        }
        for (p, v) in props {
            let Some(have) = out.get(&p) else {
                return Err(QmpError::generic(format!(
                    "Property '{}.{p}' not found",
                    cpu_typename(cpu)
                )));
            };
            let Value::Bool(want) = v else {
                return Err(QmpError::invalid_parameter_type(&p, "boolean"));
            };
            if *have != json!(want) {
                return Err(QmpError::generic(format!(
                    "CPU model '{name}' is a fixed model: Ferry cannot turn '{p}' {}",
                    if want { "on" } else { "off" }
                )));
            }
        }
        Ok(json!({"model": {"name": name, "props": out}}))
    }

    /// `qom-list-types`: the types Ferry has (machine types, CPU models, hot-pluggable
    /// devices, objects, the KVM accelerator), filtered as QEMU filters them.
    pub(super) fn qom_list_types(&self, a: Arguments) -> Result<Value, QmpError> {
        let mut a = Args::new(a);
        let implements = a.optional_str("implements")?;
        let with_abstract = a.optional_bool("abstract")?.unwrap_or(false);
        a.finish()?;
        let types = qom_types();
        let list: Vec<Value> = types
            .iter()
            .filter(|t| with_abstract || !t.is_abstract)
            .filter(|t| {
                implements
                    .as_deref()
                    .is_none_or(|i| ancestors(&types, &t.name).any(|n| n == i))
            })
            .map(|t| {
                let mut v = json!({"name": t.name});
                if let Some(p) = t.parent {
                    v["parent"] = json!(p);
                }
                if t.is_abstract {
                    v["abstract"] = json!(true);
                }
                v
            })
            .collect();
        Ok(Value::Array(list))
    }

    /// `qom-list-properties` (any type) or `device-list-properties` (`device`: devices only).
    pub(super) fn list_properties(&self, a: Arguments, device: bool) -> Result<Value, QmpError> {
        let mut a = Args::new(a);
        let name = a.required_str("typename")?;
        a.finish()?;
        let types = qom_types();
        if !device && LIBVIRT_ASSUMED_CLASSES.contains(&name.as_str()) {
            return Ok(json!([]));
        }
        let Some(t) = types.iter().find(|t| t.name == name) else {
            let what = if device { "Device" } else { "Class" };
            return Err(QmpError::new(
                ErrorClass::DeviceNotFound,
                format!("{what} '{name}' not found"),
            ));
        };
        if device && !ancestors(&types, &name).any(|n| n == "device") {
            return Err(QmpError::parameter_expects("typename", "device"));
        }
        if t.is_abstract {
            let what = if device {
                "non-abstract device type"
            } else {
                "non-abstract class"
            };
            return Err(QmpError::parameter_expects("typename", what));
        }
        let list: Vec<Value> = t
            .props
            .iter()
            .map(|(n, ty, help)| json!({"name": n, "type": ty, "description": help}))
            .collect();
        Ok(Value::Array(list))
    }
}

/// Classes Ferry does not have but answers `qom-list-properties` for with no properties:
/// libvirt 9.0 assumes every QEMU >= 4.2 has them and dereferences a null list (crashes)
/// when told the class is not found. They are not in `qom-list-types`.
const LIBVIRT_ASSUMED_CLASSES: &[&str] = &["memory-backend-file"];

/// QEMU's type name of a CPU model.
fn cpu_typename(m: CpuModel) -> String {
    format!("{}-x86_64-cpu", m.name())
}

fn has_feature(table: &[CpuidLeaf], f: &Feature) -> bool {
    machine_types::cpu::find(table, f.function, f.index)
        .is_some_and(|l| l.reg(f.reg) & (1 << f.bit) != 0)
}

/// A QOM type as `qom-list-types` and the property queries show it.
struct QomType {
    name: String,
    parent: Option<&'static str>,
    is_abstract: bool,
    /// Name, type and description of each property.
    props: Vec<(&'static str, &'static str, &'static str)>,
}

/// Every type Ferry has: abstract parents, machine types, CPU models, the `device_add`
/// drivers, the `object-add` types, the KVM accelerator.
fn qom_types() -> Vec<QomType> {
    let t = |name: &str, parent: Option<&'static str>, is_abstract, props| QomType {
        name: name.to_owned(),
        parent,
        is_abstract,
        props,
    };
    let mut out = vec![
        t("object", None, true, vec![]),
        t("machine", Some("object"), true, vec![]),
        t("device", Some("object"), true, vec![]),
        t("cpu", Some("device"), true, vec![]),
        t("x86_64-cpu", Some("cpu"), true, vec![]),
        t("cpu-core", Some("device"), true, vec![]),
        t("accel", Some("object"), true, vec![]),
        t("kvm-accel", Some("accel"), false, vec![]),
        // The machine of a `-machine none` process (no VM); not a type a VM can be given.
        t("none-machine", Some("machine"), false, vec![]),
        t(
            "ferry-cpu-core",
            Some("cpu-core"),
            false,
            vec![("core-id", "int", "Core connector to plug into")],
        ),
        t(
            "ferry-mem-block",
            Some("device"),
            false,
            vec![("slot", "int", "Memory-block connector to plug into")],
        ),
        t(
            "ferry-pci-fn",
            Some("device"),
            false,
            vec![
                ("addr", "str", "Slot and function, SLOT.FN"),
                ("multifunction", "bool", "on/off"),
            ],
        ),
        t("isa-device", Some("device"), true, vec![]),
        t(
            "isa-serial",
            Some("isa-device"),
            false,
            vec![
                ("chardev", "str", "The -chardev the UART writes to"),
                ("index", "uint32", "Only 0: COM1 at 0x3f8"),
            ],
        ),
        t("tls-creds", Some("object"), true, vec![]),
        t(
            "tls-creds-x509",
            Some("tls-creds"),
            false,
            vec![
                ("dir", "string", "Directory of the PEM files"),
                ("endpoint", "QCryptoTLSCredsEndpoint", "client or server"),
                ("verify-peer", "bool", "Require a peer certificate"),
                ("sanity-check", "bool", "Check the certificates when loaded"),
            ],
        ),
        t("authz", Some("object"), true, vec![]),
        t(
            "authz-simple",
            Some("authz"),
            false,
            vec![("identity", "string", "The one identity allowed")],
        ),
        t(
            "authz-list",
            Some("authz"),
            false,
            vec![
                ("policy", "QAuthZListPolicy", "Default policy"),
                ("rules", "QAuthZListRuleList", "Rules, first match wins"),
            ],
        ),
    ];
    for m in machine_types::all() {
        out.push(t(
            &format!("{}-machine", m.name()),
            Some("machine"),
            false,
            vec![],
        ));
    }
    let features: Vec<_> = FEATURES
        .iter()
        .map(|f| (f.name, "bool", "on/off"))
        .collect();
    for m in machine_types::cpu::ALL_MODELS {
        out.push(t(
            &cpu_typename(m),
            Some("x86_64-cpu"),
            false,
            features.clone(),
        ));
    }
    out
}

/// `name` and its ancestors.
fn ancestors<'a>(types: &'a [QomType], name: &str) -> impl Iterator<Item = &'a str> {
    let mut next = types.iter().find(|t| t.name == name);
    std::iter::from_fn(move || {
        let t = next?;
        next = t.parent.and_then(|p| types.iter().find(|u| u.name == p));
        Some(t.name.as_str())
    })
}

/// `query-command-line-options`: the options `ferry qemu-compat` accepts, with their
/// `key=value` parameters.
pub(super) fn query_command_line_options(a: Arguments) -> Result<Value, QmpError> {
    let mut a = Args::new(a);
    let option = a.optional_str("option")?;
    a.finish()?;
    let list: Vec<Value> = crate::qemu_argv::OPTIONS
        .iter()
        .filter(|o| option.as_deref().is_none_or(|n| n == o.name))
        .map(|o| {
            let params: Vec<Value> = o
                .params
                .iter()
                .map(|(n, ty, help)| json!({"name": n, "type": ty, "help": help}))
                .collect();
            json!({"option": o.name, "parameters": params})
        })
        .collect();
    if let Some(n) = option
        && list.is_empty()
    {
        return Err(QmpError::generic(format!("invalid option name: {n}")));
    }
    Ok(Value::Array(list))
}

/// The QMP backend of a `-machine none` process: the probe commands answer, the commands
/// that need a VM say so, `quit` ends the process.
#[derive(Debug)]
pub struct ProbeBackend {
    probe: Probe,
    quit: (Mutex<bool>, Condvar),
    server: Mutex<Option<ShutdownHandle>>,
}

impl ProbeBackend {
    pub fn new(probe: Probe) -> Arc<ProbeBackend> {
        Arc::new(ProbeBackend {
            probe,
            quit: (Mutex::new(false), Condvar::new()),
            server: Mutex::new(None),
        })
    }

    /// Let `quit` stop the QMP server too.
    pub fn set_server(&self, h: ShutdownHandle) {
        *super::lock(&self.server) = Some(h);
    }

    /// Ask the process to exit (`quit`, a signal).
    pub fn request_quit(&self) {
        *super::lock(&self.quit.0) = true;
        self.quit.1.notify_all();
        if let Some(h) = super::lock(&self.server).as_ref() {
            h.shutdown();
        }
    }

    /// Block until `quit` (or [`ProbeBackend::request_quit`]).
    pub fn wait_quit(&self) {
        let mut q = super::lock(&self.quit.0);
        while !*q {
            q = self.quit.1.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl QmpBackend for ProbeBackend {
    fn commands(&self) -> Vec<&'static str> {
        commands::COMMANDS.iter().map(|c| c.name).collect()
    }

    fn execute(&self, command: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        let Some(c) = commands::find(command) else {
            return Err(QmpError::unknown_command(command));
        };
        c.check_args(&arguments)?;
        match c.run {
            Run::Host(f) => f(&self.probe, arguments),
            Run::Vm(_) if command == "quit" => {
                Args::new(arguments).finish()?;
                self.request_quit();
                Ok(json!({}))
            }
            Run::Vm(_) | Run::Fds(..) => Err(QmpError::generic(format!(
                "{command} needs a VM; this process was started with -machine none"
            ))),
        }
    }
}
