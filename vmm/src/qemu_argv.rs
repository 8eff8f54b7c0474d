//! QEMU's command line as `ferry qemu-compat` takes it: what libvirt passes to probe an
//! emulator (`-machine none`) and to run a domain. Every option is either honoured,
//! accepted because it changes nothing in Ferry (documented per option), or refused with
//! an error naming it.

use std::collections::BTreeMap;

/// A QEMU option `ferry qemu-compat` accepts.
#[derive(Debug)]
pub struct QemuOption {
    /// Name without the dash.
    pub name: &'static str,
    /// Takes a value.
    pub takes_value: bool,
    /// `key=value` parameters: name, `query-command-line-options` type, help.
    pub params: &'static [(&'static str, &'static str, &'static str)],
    /// What Ferry does with it.
    pub help: &'static str,
}

const fn flag(name: &'static str, help: &'static str) -> QemuOption {
    QemuOption {
        name,
        takes_value: false,
        params: &[],
        help,
    }
}

const fn valued(
    name: &'static str,
    params: &'static [(&'static str, &'static str, &'static str)],
    help: &'static str,
) -> QemuOption {
    QemuOption {
        name,
        takes_value: true,
        params,
        help,
    }
}

/// Every accepted option (also `query-command-line-options`' answer).
pub const OPTIONS: &[QemuOption] = &[
    flag("S", "do not start the guest until 'cont'"),
    flag(
        "no-user-config",
        "accepted: Ferry reads no configuration files",
    ),
    flag("nodefaults", "accepted: Ferry creates no default devices"),
    flag("nographic", "accepted: Ferry has no display"),
    flag("no-acpi", "accepted: Ferry's machines have no ACPI"),
    flag(
        "no-shutdown",
        "accepted: the process never exits when the guest stops (Ferry's only behaviour)",
    ),
    flag("daemonize", "detach once the QMP socket is listening"),
    valued(
        "machine",
        &[
            (
                "type",
                "string",
                "a Ferry machine type, or 'none' (a probe process)",
            ),
            (
                "accel",
                "string",
                "accelerator list; Ferry runs on kvm only",
            ),
            ("usb", "boolean", "only off: Ferry has no USB"),
            (
                "dump-guest-core",
                "boolean",
                "only off: guest RAM is left out of core dumps",
            ),
        ],
        "machine type and accelerator",
    ),
    valued("accel", &[], "only kvm"),
    valued("cpu", &[], "one of the machine type's CPU models"),
    valued(
        "m",
        &[("size", "size", "guest RAM, MiB without a suffix")],
        "guest RAM",
    ),
    valued(
        "smp",
        &[
            ("cpus", "number", "boot vCPUs"),
            ("maxcpus", "number", "boot vCPUs plus hot-pluggable cores"),
            ("sockets", "number", "sockets x cores = maxcpus"),
            ("dies", "number", "only 1"),
            ("cores", "number", "sockets x cores = maxcpus"),
            ("threads", "number", "only 1: a ferry-cpu-core has one vCPU"),
        ],
        "boot vCPUs and hot-pluggable cores (one vCPU each)",
    ),
    valued(
        "name",
        &[
            ("guest", "string", "the guest's name"),
            (
                "debug-threads",
                "boolean",
                "accepted: vCPU threads are named vcpuN",
            ),
        ],
        "the guest's name",
    ),
    valued("uuid", &[], "the guest's UUID (query-uuid)"),
    valued("display", &[], "only none: Ferry has no display"),
    valued(
        "overcommit",
        &[("mem-lock", "boolean", "only off: guest RAM is not locked")],
        "memory locking",
    ),
    valued(
        "rtc",
        &[("base", "string", "only utc: Ferry's machines have no RTC")],
        "real-time clock",
    ),
    valued(
        "boot",
        &[("strict", "boolean", "accepted: Ferry has no boot devices")],
        "boot order",
    ),
    valued(
        "msg",
        &[(
            "timestamp",
            "boolean",
            "accepted: Ferry's log lines carry timestamps",
        )],
        "message format",
    ),
    valued(
        "audiodev",
        &[("driver", "string", "only none: Ferry has no sound")],
        "audio backend",
    ),
    valued(
        "object",
        &[("qom-type", "string", "secret (libvirt's master key)")],
        "an object",
    ),
    valued(
        "chardev",
        &[
            ("backend", "string", "socket (a listening fd), pty or file"),
            ("id", "string", "chardev id"),
            ("fd", "number", "socket: the listening descriptor"),
            ("server", "boolean", "socket: only on"),
            ("wait", "boolean", "socket: only off"),
            ("path", "string", "file: the output file"),
            ("append", "boolean", "file: append"),
        ],
        "a character device",
    ),
    valued(
        "mon",
        &[
            ("chardev", "string", "a socket chardev"),
            ("id", "string", "monitor id"),
            ("mode", "string", "only control (QMP)"),
        ],
        "the QMP monitor on a chardev",
    ),
    valued(
        "device",
        &[
            ("driver", "string", "only isa-serial"),
            ("chardev", "string", "the UART's chardev"),
            ("id", "string", "device id"),
            ("index", "number", "only 0: COM1"),
        ],
        "a cold-plugged device",
    ),
    valued(
        "add-fd",
        &[
            ("fd", "number", "an inherited descriptor"),
            (
                "set",
                "number",
                "its fdset: a chardev's path=/dev/fdset/SET",
            ),
            ("opaque", "string", "a label"),
        ],
        "a descriptor a file chardev writes to",
    ),
    valued("kernel", &[], "a 512-byte boot sector, run at 0x7c00"),
    valued(
        "incoming",
        &[],
        "defer, tcp:HOST:PORT, file:PATH or fd:N: wait for a migration",
    ),
    valued(
        "qmp",
        &[
            ("server", "boolean", "must be on"),
            ("wait", "boolean", "must be off"),
        ],
        "QMP monitor on unix:PATH",
    ),
    valued("pidfile", &[], "write the process id to this file"),
];

/// A command line `ferry qemu-compat` cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QemuArgvError {
    #[error("Unsupported option '-{0}'")]
    Unknown(String),
    #[error("Unsupported argument '{0}' (QEMU's disk image shorthand)")]
    Positional(String),
    #[error("Option '-{0}' needs a value")]
    MissingValue(&'static str),
    #[error("Option '-{option}': {why}")]
    Invalid { option: &'static str, why: String },
    #[error("Option '-{0}' is required")]
    Required(&'static str),
    #[error("Ferry has no device '{0}'")]
    NoDevice(String),
}

/// Where QMP is served.
#[derive(Debug, PartialEq, Eq)]
pub enum Monitor {
    /// `-qmp unix:PATH,server=on,wait=off`: a socket Ferry binds.
    Path(String),
    /// `-chardev socket,id=ID,fd=N,server=on,wait=off -mon chardev=ID,mode=control`: a
    /// listening socket the caller (libvirt) bound and passed.
    Fd(i32),
}

/// The backend of the guest's serial port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    /// A new pseudo-terminal (`query-chardev` names it).
    Pty,
    /// Output appended (or written) to a file.
    File { path: String, append: bool },
}

/// The guest's serial port: its chardev id and backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Serial {
    pub chardev: String,
    /// The device's `id`.
    pub id: Option<String>,
    pub backend: SerialBackend,
}

/// A domain: what a VM is made of.
#[derive(Debug, PartialEq, Eq)]
pub struct Domain {
    /// Machine type name.
    pub machine: String,
    /// `-cpu`.
    pub cpu: Option<String>,
    /// Guest RAM in bytes (default 128 MiB, as QEMU).
    pub memory: u64,
    /// Boot vCPUs.
    pub vcpus: u8,
    /// Boot vCPUs plus hot-pluggable cores.
    pub max_vcpus: u8,
    /// `-name guest=`.
    pub name: Option<String>,
    /// `-uuid`.
    pub uuid: Option<String>,
    /// The serial port, if any.
    pub serial: Option<Serial>,
    /// `-kernel`: a boot-sector image (otherwise the built-in test guest).
    pub kernel: Option<String>,
    /// `-incoming`.
    pub incoming: Option<String>,
    /// `-object secret,...,file=PATH`: files the secrets are read from.
    pub secret_files: Vec<String>,
    /// `-add-fd set=SET,fd=FD`: the inherited descriptor of each fdset a chardev's
    /// `path=/dev/fdset/SET` names.
    pub fdsets: BTreeMap<u32, i32>,
}

/// A parsed QEMU command line.
#[derive(Debug, PartialEq, Eq)]
pub struct QemuArgs {
    /// `-S`.
    pub paused: bool,
    /// The QMP monitor.
    pub monitor: Monitor,
    /// `-pidfile`.
    pub pidfile: Option<String>,
    /// `-daemonize`.
    pub daemonize: bool,
    /// The VM; `None` for `-machine none` (a probe process).
    pub domain: Option<Domain>,
}

fn invalid(option: &'static str, why: impl Into<String>) -> QemuArgvError {
    QemuArgvError::Invalid {
        option,
        why: why.into(),
    }
}

/// An option's value as `key=value` pairs: QEMU's keyval form (`,,` is a literal comma; a
/// first part without `=` is `implied`'s value, a later one `key=on`) or a JSON object.
fn props(
    option: &'static str,
    value: &str,
    implied: &str,
) -> Result<Vec<(String, String)>, QemuArgvError> {
    if value.starts_with('{') {
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(value)
            .map_err(|e| invalid(option, format!("invalid JSON: {e}")))?;
        return obj
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k, s)),
                serde_json::Value::Bool(b) => Ok((k, if b { "on" } else { "off" }.to_owned())),
                serde_json::Value::Number(n) => Ok((k, n.to_string())),
                _ => Err(invalid(option, format!("'{k}': unsupported value {v}"))),
            })
            .collect();
    }
    Ok(crate::control::split_opts(value)
        .into_iter()
        .enumerate()
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None if i == 0 && !implied.is_empty() => (implied.to_owned(), p),
            None => match p.strip_prefix("no") {
                Some(k) if !k.is_empty() => (k.to_owned(), "off".to_owned()),
                _ => (p, "on".to_owned()),
            },
        })
        .collect())
}

/// Takes the parameters of one option value, refusing any left unread.
struct Props {
    option: &'static str,
    map: BTreeMap<String, String>,
}

impl Props {
    fn new(option: &'static str, value: &str, implied: &str) -> Result<Props, QemuArgvError> {
        let mut map = BTreeMap::new();
        for (k, v) in props(option, value, implied)? {
            if map.insert(k.clone(), v).is_some() {
                return Err(invalid(option, format!("'{k}' given twice")));
            }
        }
        Ok(Props { option, map })
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }

    fn require(&mut self, key: &str) -> Result<String, QemuArgvError> {
        self.take(key)
            .ok_or_else(|| invalid(self.option, format!("'{key}' is required")))
    }

    /// Takes `key`, which may only be absent or one of `allowed`.
    fn only(&mut self, key: &str, allowed: &[&str], why: &str) -> Result<(), QemuArgvError> {
        match self.take(key) {
            Some(v) if !allowed.contains(&v.as_str()) => {
                Err(invalid(self.option, format!("{key}={v}: {why}")))
            }
            _ => Ok(()),
        }
    }

    fn number(&mut self, key: &str) -> Result<Option<u32>, QemuArgvError> {
        self.take(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| invalid(self.option, format!("{key}={v}: not a number")))
            })
            .transpose()
    }

    fn flag(&mut self, key: &str) -> Result<Option<bool>, QemuArgvError> {
        match self.take(key).as_deref() {
            None => Ok(None),
            Some("on" | "true" | "yes") => Ok(Some(true)),
            Some("off" | "false" | "no") => Ok(Some(false)),
            Some(v) => Err(invalid(
                self.option,
                format!("{key}={v}: expected on or off"),
            )),
        }
    }

    /// Refuses what was not taken.
    fn finish(self) -> Result<(), QemuArgvError> {
        match self.map.into_iter().next() {
            Some((k, v)) => Err(invalid(
                self.option,
                format!("unsupported property '{k}={v}'"),
            )),
            None => Ok(()),
        }
    }
}

/// A `-chardev` definition.
#[derive(Debug)]
enum Chardev {
    Socket(i32),
    Serial(SerialBackend),
}

/// Everything seen, before the chardevs are tied to their users.
#[derive(Default)]
struct Seen {
    machine: Option<String>,
    accel_kvm: bool,
    cpu: Option<String>,
    memory: Option<u64>,
    smp: Option<(u8, u8)>,
    name: Option<String>,
    uuid: Option<String>,
    qmp: Option<String>,
    chardevs: BTreeMap<String, Chardev>,
    mon: Option<String>,
    /// The serial port's chardev and device id.
    serial: Option<(String, Option<String>)>,
    kernel: Option<String>,
    incoming: Option<String>,
    secret_files: Vec<String>,
    fdsets: BTreeMap<u32, i32>,
}

/// Parses QEMU's argv (without the program name): a probe process (`-machine none` with
/// `-qmp`) or a domain (a Ferry machine type with a monitor).
pub fn parse(argv: &[String]) -> Result<QemuArgs, QemuArgvError> {
    let mut paused = false;
    let mut daemonize = false;
    let mut pidfile = None;
    let mut s = Seen::default();
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let name = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .ok_or_else(|| QemuArgvError::Positional(arg.clone()))?;
        let Some(opt) = OPTIONS.iter().find(|o| o.name == name) else {
            return Err(QemuArgvError::Unknown(name.to_owned()));
        };
        let v = if opt.takes_value {
            it.next()
                .ok_or(QemuArgvError::MissingValue(opt.name))?
                .as_str()
        } else {
            ""
        };
        match opt.name {
            "S" => paused = true,
            // Meaningless for Ferry, accepted (see OPTIONS).
            "no-user-config" | "nodefaults" | "nographic" | "no-acpi" | "no-shutdown" => {}
            "daemonize" => daemonize = true,
            "pidfile" => pidfile = Some(v.to_owned()),
            "qmp" => s.qmp = Some(parse_qmp(v)?),
            "machine" => {
                let (ty, kvm) = parse_machine(v)?;
                s.machine = Some(ty);
                s.accel_kvm |= kvm;
            }
            "accel" => {
                let mut p = Props::new("accel", v, "accel")?;
                p.only("accel", &["kvm"], "Ferry runs on kvm only")?;
                p.finish()?;
                s.accel_kvm = true;
            }
            "cpu" => {
                let mut p = Props::new("cpu", v, "model")?;
                s.cpu = Some(p.require("model")?);
                if let Some((k, v)) = p.map.into_iter().next() {
                    return Err(invalid(
                        "cpu",
                        format!("'{k}={v}': Ferry's CPU models are fixed (no feature changes)"),
                    ));
                }
            }
            "m" => s.memory = Some(parse_memory(v)?),
            "smp" => s.smp = Some(parse_smp(v)?),
            "name" => {
                let mut p = Props::new("name", v, "guest")?;
                s.name = p.take("guest");
                p.flag("debug-threads")?;
                p.finish()?;
            }
            "uuid" => s.uuid = Some(v.to_owned()),
            "display" => {
                let mut p = Props::new("display", v, "type")?;
                p.only("type", &["none"], "Ferry has no display")?;
                p.finish()?;
            }
            "overcommit" => {
                let mut p = Props::new("overcommit", v, "")?;
                p.only("mem-lock", &["off"], "Ferry does not lock guest RAM")?;
                p.finish()?;
            }
            "rtc" => {
                let mut p = Props::new("rtc", v, "")?;
                p.only("base", &["utc"], "Ferry's machines have no RTC to set")?;
                p.finish()?;
            }
            "boot" => {
                let mut p = Props::new("boot", v, "order")?;
                p.flag("strict")?;
                p.finish()?;
            }
            "msg" => {
                let mut p = Props::new("msg", v, "")?;
                p.flag("timestamp")?;
                p.finish()?;
            }
            "audiodev" => {
                let mut p = Props::new("audiodev", v, "driver")?;
                p.only("driver", &["none"], "Ferry has no sound")?;
                p.take("id");
                p.finish()?;
            }
            "object" => {
                let mut p = Props::new("object", v, "qom-type")?;
                let ty = p.require("qom-type")?;
                if ty != "secret" {
                    return Err(invalid(
                        "object",
                        format!("Ferry has no object type '{ty}'"),
                    ));
                }
                p.require("id")?;
                p.only("format", &["raw"], "only raw secrets")?;
                s.secret_files.push(p.require("file")?);
                p.finish()?;
            }
            "chardev" => {
                let (id, c) = parse_chardev(v)?;
                if s.chardevs.insert(id.clone(), c).is_some() {
                    return Err(invalid("chardev", format!("duplicate id '{id}'")));
                }
            }
            "mon" => {
                let mut p = Props::new("mon", v, "chardev")?;
                s.mon = Some(p.require("chardev")?);
                p.take("id");
                p.only("mode", &["control"], "Ferry speaks QMP only")?;
                p.flag("pretty")?;
                p.finish()?;
            }
            "device" => {
                let mut p = Props::new("device", v, "driver")?;
                let driver = p.require("driver")?;
                if driver != "isa-serial" {
                    return Err(QemuArgvError::NoDevice(driver));
                }
                if s.serial.is_some() {
                    return Err(invalid("device", "Ferry has one serial port (COM1)"));
                }
                s.serial = Some((p.require("chardev")?, p.take("id")));
                p.only("index", &["0"], "Ferry has one serial port (COM1)")?;
                p.finish()?;
            }
            "add-fd" => {
                let mut p = Props::new("add-fd", v, "")?;
                let fd = p
                    .number("fd")?
                    .ok_or_else(|| invalid("add-fd", "'fd' is required"))?;
                let set = p
                    .number("set")?
                    .ok_or_else(|| invalid("add-fd", "'set' is required"))?;
                p.take("opaque");
                p.finish()?;
                let fd = i32::try_from(fd).map_err(|_| invalid("add-fd", format!("fd={fd}")))?;
                if s.fdsets.insert(set, fd).is_some() {
                    return Err(invalid(
                        "add-fd",
                        format!("set={set}: Ferry takes one descriptor per fdset"),
                    ));
                }
            }
            "kernel" => s.kernel = Some(v.to_owned()),
            "incoming" => s.incoming = Some(v.to_owned()),
            _ => return Err(QemuArgvError::Unknown(name.to_owned())),
        }
    }
    let machine = s.machine.take().ok_or(QemuArgvError::Required("machine"))?;
    if !s.accel_kvm && machine != "none" {
        return Err(QemuArgvError::Required("accel"));
    }
    if machine == "none" {
        return probe_args(s, paused, pidfile, daemonize);
    }
    let monitor = match (s.qmp.take(), s.mon.take()) {
        (Some(p), None) => Monitor::Path(p),
        (None, Some(id)) => match s.chardevs.remove(&id) {
            Some(Chardev::Socket(fd)) => Monitor::Fd(fd),
            Some(_) => return Err(invalid("mon", format!("chardev '{id}' is not a socket"))),
            None => return Err(invalid("mon", format!("no chardev '{id}'"))),
        },
        (Some(_), Some(_)) => return Err(invalid("mon", "one monitor only (-qmp or -mon)")),
        (None, None) => return Err(QemuArgvError::Required("mon")),
    };
    let serial = match s.serial.take() {
        None => None,
        Some((id, device)) => match s.chardevs.remove(&id) {
            Some(Chardev::Serial(backend)) => Some(Serial {
                chardev: id,
                id: device,
                backend,
            }),
            Some(Chardev::Socket(_)) => {
                return Err(invalid(
                    "device",
                    format!(
                        "isa-serial: chardev '{id}' is a socket; Ferry's UART takes pty or file"
                    ),
                ));
            }
            None => return Err(invalid("device", format!("isa-serial: no chardev '{id}'"))),
        },
    };
    if let Some(id) = s.chardevs.keys().next() {
        return Err(invalid("chardev", format!("'{id}' is used by nothing")));
    }
    let used_set = match &serial {
        Some(Serial {
            backend: SerialBackend::File { path, .. },
            ..
        }) => path
            .strip_prefix("/dev/fdset/")
            .map(|n| {
                n.parse::<u32>()
                    .ok()
                    .filter(|n| s.fdsets.contains_key(n))
                    .ok_or_else(|| invalid("chardev", format!("path={path}: no such fdset")))
            })
            .transpose()?,
        _ => None,
    };
    if let Some(set) = s.fdsets.keys().find(|k| Some(**k) != used_set) {
        return Err(invalid("add-fd", format!("fdset {set} is used by nothing")));
    }
    let (vcpus, max_vcpus) = s.smp.unwrap_or((1, 1));
    Ok(QemuArgs {
        paused,
        monitor,
        pidfile,
        daemonize,
        domain: Some(Domain {
            machine,
            cpu: s.cpu,
            memory: s.memory.unwrap_or(128 << 20),
            vcpus,
            max_vcpus,
            name: s.name,
            uuid: s.uuid,
            serial,
            kernel: s.kernel,
            incoming: s.incoming,
            secret_files: s.secret_files,
            fdsets: s.fdsets,
        }),
    })
}

/// A probe process takes only `-qmp` and the flags.
fn probe_args(
    s: Seen,
    paused: bool,
    pidfile: Option<String>,
    daemonize: bool,
) -> Result<QemuArgs, QemuArgvError> {
    let domain_only = [
        (s.cpu.is_some(), "cpu"),
        (s.memory.is_some(), "m"),
        (s.smp.is_some(), "smp"),
        (!s.chardevs.is_empty(), "chardev"),
        (s.mon.is_some(), "mon"),
        (s.serial.is_some(), "device"),
        (s.kernel.is_some(), "kernel"),
        (s.incoming.is_some(), "incoming"),
        (!s.fdsets.is_empty(), "add-fd"),
    ];
    if let Some((_, o)) = domain_only.iter().find(|(set, _)| *set) {
        return Err(invalid(
            o,
            "needs a machine type (-machine none is a probe process)",
        ));
    }
    Ok(QemuArgs {
        paused,
        monitor: Monitor::Path(s.qmp.ok_or(QemuArgvError::Required("qmp"))?),
        pidfile,
        daemonize,
        domain: None,
    })
}

/// `-machine [type=]TYPE[,accel=A:B...][,usb=off][,dump-guest-core=off]`: the type and
/// whether `accel` named kvm.
fn parse_machine(v: &str) -> Result<(String, bool), QemuArgvError> {
    let mut p = Props::new("machine", v, "type")?;
    let ty = p
        .take("type")
        .ok_or_else(|| invalid("machine", "no machine type"))?;
    let kvm = match p.take("accel") {
        Some(list) if !list.split(':').any(|a| a == "kvm") => {
            return Err(invalid(
                "machine",
                format!("accel={list}: Ferry runs on kvm only"),
            ));
        }
        Some(_) => true,
        None => false,
    };
    p.only("usb", &["off"], "Ferry has no USB")?;
    p.only(
        "dump-guest-core",
        &["off"],
        "Ferry leaves guest RAM out of core dumps",
    )?;
    p.finish()?;
    if ty != "none" && machine_types::MachineType::lookup(&ty).is_err() {
        let valid: Vec<_> = machine_types::all().iter().map(|m| m.name()).collect();
        return Err(invalid(
            "machine",
            format!(
                "machine type '{ty}': valid types are none, {}",
                valid.join(", ")
            ),
        ));
    }
    Ok((ty, kvm))
}

/// `-m [size=]SIZE`: MiB without a suffix, as QEMU.
fn parse_memory(v: &str) -> Result<u64, QemuArgvError> {
    let mut p = Props::new("m", v, "size")?;
    let size = p.require("size")?;
    p.finish()?;
    let bytes = if size.bytes().all(|b| b.is_ascii_digit()) {
        size.parse::<u64>()
            .ok()
            .and_then(|m| m.checked_mul(1 << 20))
    } else {
        crate::config::parse_size(&size).ok()
    };
    bytes.ok_or_else(|| invalid("m", format!("invalid size '{size}'")))
}

/// `-smp [cpus=]N[,maxcpus=M][,sockets=S][,dies=1][,cores=C][,threads=1]`: boot vCPUs and
/// their maximum (every unit above N is one hot-pluggable `ferry-cpu-core`).
fn parse_smp(v: &str) -> Result<(u8, u8), QemuArgvError> {
    let mut p = Props::new("smp", v, "cpus")?;
    let cpus = p.number("cpus")?.unwrap_or(1);
    let max = p.number("maxcpus")?.unwrap_or(cpus);
    let sockets = p.number("sockets")?;
    let cores = p.number("cores")?;
    if p.number("dies")?.is_some_and(|d| d != 1) {
        return Err(invalid("smp", "dies: only 1"));
    }
    if p.number("threads")?.is_some_and(|t| t != 1) {
        return Err(invalid(
            "smp",
            "threads: only 1 (a ferry-cpu-core has one vCPU)",
        ));
    }
    p.finish()?;
    if let (Some(s), Some(c)) = (sockets, cores)
        && s.checked_mul(c) != Some(max)
    {
        return Err(invalid(
            "smp",
            format!("sockets={s} x cores={c} is not maxcpus={max}"),
        ));
    }
    let limit = u32::from(crate::config::MAX_VCPUS);
    if cpus == 0 || max < cpus || max > limit {
        return Err(invalid(
            "smp",
            format!("cpus={cpus},maxcpus={max}: need 1 <= cpus <= maxcpus <= {limit}"),
        ));
    }
    // Both fit: at most MAX_VCPUS (a u8).
    Ok((cpus as u8, max as u8))
}

/// `-chardev BACKEND,id=ID,...`: a listening socket passed by descriptor, a pty or a file.
fn parse_chardev(v: &str) -> Result<(String, Chardev), QemuArgvError> {
    let mut p = Props::new("chardev", v, "backend")?;
    let backend = p.require("backend")?;
    let id = p.require("id")?;
    let c = match backend.as_str() {
        "socket" => {
            let fd = p
                .number("fd")?
                .ok_or_else(|| invalid("chardev", "socket: only fd=N (a listening socket)"))?;
            if p.flag("server")? != Some(true) || p.flag("wait")? != Some(false) {
                return Err(invalid("chardev", "socket: needs server=on,wait=off"));
            }
            Chardev::Socket(i32::try_from(fd).map_err(|_| invalid("chardev", format!("fd={fd}")))?)
        }
        "pty" => Chardev::Serial(SerialBackend::Pty),
        "file" => Chardev::Serial(SerialBackend::File {
            path: p.require("path")?,
            append: p.flag("append")?.unwrap_or(false),
        }),
        other => {
            return Err(invalid(
                "chardev",
                format!("backend '{other}': Ferry has socket (fd=N), pty and file"),
            ));
        }
    };
    p.flag("logappend")?;
    p.finish()?;
    Ok((id, c))
}

/// `-qmp unix:PATH[,server[=on]][,wait=off|,nowait]`: a listening socket that does not wait.
fn parse_qmp(v: &str) -> Result<String, QemuArgvError> {
    let mut parts = v.split(',');
    let path = parts
        .next()
        .and_then(|p| p.strip_prefix("unix:"))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| invalid("qmp", format!("'{v}': only unix:PATH is supported")))?;
    let (mut server, mut wait) = (false, true);
    for part in parts {
        match part {
            "server" | "server=on" => server = true,
            "nowait" | "wait=off" => wait = false,
            "server=off" | "wait=on" => {
                return Err(invalid(
                    "qmp",
                    format!("'{part}': Ferry only listens, without waiting"),
                ));
            }
            _ => return Err(invalid("qmp", format!("unsupported property '{part}'"))),
        }
    }
    if !server || wait {
        return Err(invalid("qmp", "needs server=on,wait=off"));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_libvirt_probe_argv() {
        let a = parse(&argv(
            "-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg \
             -qmp unix:/run/q.monitor,server=on,wait=off -pidfile /run/q.pid -daemonize",
        ))
        .expect("libvirt's probe argv");
        assert_eq!(
            a,
            QemuArgs {
                paused: true,
                monitor: Monitor::Path("/run/q.monitor".into()),
                pidfile: Some("/run/q.pid".into()),
                daemonize: true,
                domain: None,
            }
        );
    }

    /// What libvirt 9.0 passed for the README's domain XML.
    const LIBVIRT_DOMAIN: &str = "-name guest=ferry1,debug-threads=on -S \
        -object secret,id=masterKey0,format=raw,file=/run/master-key.aes \
        -machine ferry-2.1,usb=off,dump-guest-core=off -accel kvm -cpu ferry-v2 -m 64 \
        -overcommit mem-lock=off -smp 1,maxcpus=2,sockets=2,cores=1,threads=1 \
        -uuid 226378e8-3f6d-41ca-b8a9-ca971c113501 -display none -no-user-config -nodefaults \
        -chardev socket,id=charmonitor,fd=5,server=on,wait=off \
        -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc -no-shutdown -no-acpi \
        -boot strict=on -chardev pty,id=charserial0 \
        -device isa-serial,chardev=charserial0,id=serial0,index=0 \
        -audiodev {\"id\":\"audio1\",\"driver\":\"none\"} -msg timestamp=on";

    #[test]
    fn parses_libvirt_domain_argv() {
        let a = parse(&argv(LIBVIRT_DOMAIN)).expect("libvirt's domain argv");
        assert_eq!(a.monitor, Monitor::Fd(5));
        assert!(a.paused);
        let d = a.domain.expect("a domain");
        assert_eq!(
            d,
            Domain {
                machine: "ferry-2.1".into(),
                cpu: Some("ferry-v2".into()),
                memory: 64 << 20,
                vcpus: 1,
                max_vcpus: 2,
                name: Some("ferry1".into()),
                uuid: Some("226378e8-3f6d-41ca-b8a9-ca971c113501".into()),
                serial: Some(Serial {
                    chardev: "charserial0".into(),
                    id: Some("serial0".into()),
                    backend: SerialBackend::Pty
                }),
                kernel: None,
                incoming: None,
                secret_files: vec!["/run/master-key.aes".into()],
                fdsets: BTreeMap::new(),
            }
        );
    }

    #[test]
    fn parses_a_serial_file_libvirt_passes_as_an_fdset() {
        let a = parse(&argv(&LIBVIRT_DOMAIN.replace(
            "-chardev pty,id=charserial0",
            "-add-fd set=0,fd=9,opaque=serial0-source \
             -chardev file,id=charserial0,path=/dev/fdset/0,append=on",
        )))
        .expect("a file serial port");
        let d = a.domain.expect("a domain");
        assert_eq!(d.fdsets, BTreeMap::from([(0, 9)]));
        assert_eq!(
            d.serial.map(|s| s.backend),
            Some(SerialBackend::File {
                path: "/dev/fdset/0".into(),
                append: true
            })
        );
        let err = |s: &str| parse(&argv(s)).unwrap_err().to_string();
        assert_eq!(
            err(&format!("{LIBVIRT_DOMAIN} -add-fd set=1,fd=10")),
            "Option '-add-fd': fdset 1 is used by nothing"
        );
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        let err = |s: &str| parse(&argv(s)).unwrap_err().to_string();
        let qmp = "-qmp unix:/q,server=on,wait=off";
        assert_eq!(
            err(&format!("-machine none,accel=tcg {qmp}")),
            "Option '-machine': accel=tcg: Ferry runs on kvm only"
        );
        assert_eq!(
            err(&format!("-machine none {qmp} -vnc :0")),
            "Unsupported option '-vnc'"
        );
        assert_eq!(
            err(&format!("-machine pc-q35-7.2 {qmp}")),
            "Option '-machine': machine type 'pc-q35-7.2': valid types are none, ferry-2.1, \
             ferry-2.0, ferry-1.1, ferry-1.0"
        );
        assert_eq!(
            err("-machine none -qmp unix:/q,server=on,wait=on"),
            "Option '-qmp': 'wait=on': Ferry only listens, without waiting"
        );
        assert_eq!(
            err("-machine none -qmp tcp:1.2.3.4:5,server=on,wait=off"),
            "Option '-qmp': 'tcp:1.2.3.4:5,server=on,wait=off': only unix:PATH is supported"
        );
        assert_eq!(err("-machine none"), "Option '-qmp' is required");
        assert_eq!(
            err(&format!("{qmp} -machine")),
            "Option '-machine' needs a value"
        );
        assert_eq!(
            err("stray"),
            "Unsupported argument 'stray' (QEMU's disk image shorthand)"
        );
        let with = |extra: &str| err(&format!("{LIBVIRT_DOMAIN} {extra}"));
        assert_eq!(
            with("-device ib700,id=watchdog0"),
            "Ferry has no device 'ib700'"
        );
        assert_eq!(
            with("-device {\"driver\":\"virtio-net-pci\",\"id\":\"net0\"}"),
            "Ferry has no device 'virtio-net-pci'"
        );
        assert_eq!(
            with("-overcommit mem-lock=on"),
            "Option '-overcommit': mem-lock=on: Ferry does not lock guest RAM"
        );
        assert_eq!(
            with("-chardev pty,id=charserial1"),
            "Option '-chardev': 'charserial1' is used by nothing"
        );
        assert_eq!(
            err(&LIBVIRT_DOMAIN.replace("threads=1", "threads=2")),
            "Option '-smp': threads: only 1 (a ferry-cpu-core has one vCPU)"
        );
        assert_eq!(
            err(&LIBVIRT_DOMAIN.replace("-rtc base=utc", "-rtc base=localtime")),
            "Option '-rtc': base=localtime: Ferry's machines have no RTC to set"
        );
        assert_eq!(
            err(&LIBVIRT_DOMAIN.replace("-cpu ferry-v2", "-cpu ferry-v2,avx2=on")),
            "Option '-cpu': 'avx2=on': Ferry's CPU models are fixed (no feature changes)"
        );
        assert_eq!(
            err(&LIBVIRT_DOMAIN.replace("-accel kvm", "-accel tcg")),
            "Option '-accel': accel=tcg: Ferry runs on kvm only"
        );
        assert_eq!(
            err(&LIBVIRT_DOMAIN.replace("-machine ferry-2.1,", "-machine ferry-2.1,hpet=off,")),
            "Option '-machine': unsupported property 'hpet=off'"
        );
    }
}
