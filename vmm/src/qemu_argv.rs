//! QEMU's command line as `ferry qemu-compat` takes it (what libvirt passes when it probes
//! an emulator). Every option is either honoured, accepted because it changes nothing in
//! Ferry (documented per option), or refused with an error naming it.

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

/// Every accepted option (also `query-command-line-options`' answer).
pub const OPTIONS: &[QemuOption] = &[
    QemuOption {
        name: "S",
        takes_value: false,
        params: &[],
        help: "do not start the guest (a probe process has none)",
    },
    QemuOption {
        name: "no-user-config",
        takes_value: false,
        params: &[],
        help: "accepted: Ferry reads no configuration files",
    },
    QemuOption {
        name: "nodefaults",
        takes_value: false,
        params: &[],
        help: "accepted: Ferry creates no default devices",
    },
    QemuOption {
        name: "nographic",
        takes_value: false,
        params: &[],
        help: "accepted: Ferry has no display",
    },
    QemuOption {
        name: "machine",
        takes_value: true,
        params: &[
            (
                "type",
                "string",
                "machine type; only 'none' (a probe process) so far",
            ),
            (
                "accel",
                "string",
                "accelerator list; Ferry runs on kvm only",
            ),
        ],
        help: "machine type and accelerator",
    },
    QemuOption {
        name: "qmp",
        takes_value: true,
        params: &[
            ("server", "boolean", "must be on"),
            ("wait", "boolean", "must be off"),
        ],
        help: "QMP monitor on unix:PATH",
    },
    QemuOption {
        name: "pidfile",
        takes_value: true,
        params: &[],
        help: "write the process id to this file",
    },
    QemuOption {
        name: "daemonize",
        takes_value: false,
        params: &[],
        help: "detach once the QMP socket is listening",
    },
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
}

/// A parsed QEMU command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QemuArgs {
    /// `-S`.
    pub paused: bool,
    /// `-qmp unix:PATH,server=on,wait=off`: the socket path.
    pub qmp: String,
    /// `-pidfile`.
    pub pidfile: Option<String>,
    /// `-daemonize`.
    pub daemonize: bool,
}

fn invalid(option: &'static str, why: impl Into<String>) -> QemuArgvError {
    QemuArgvError::Invalid {
        option,
        why: why.into(),
    }
}

/// Parses QEMU's argv (without the program name). Only a probe process (`-machine none`)
/// is supported so far; `-machine` and `-qmp` are required.
pub fn parse(argv: &[String]) -> Result<QemuArgs, QemuArgvError> {
    let mut out = QemuArgs::default();
    let mut machine = None;
    let mut qmp = None;
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        let name = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .ok_or_else(|| QemuArgvError::Positional(arg.clone()))?;
        let Some(opt) = OPTIONS.iter().find(|o| o.name == name) else {
            return Err(QemuArgvError::Unknown(name.to_owned()));
        };
        let value = if opt.takes_value {
            Some(
                it.next()
                    .ok_or(QemuArgvError::MissingValue(opt.name))?
                    .as_str(),
            )
        } else {
            None
        };
        match (opt.name, value) {
            ("S", _) => out.paused = true,
            // Meaningless for Ferry, accepted (see OPTIONS).
            ("no-user-config" | "nodefaults" | "nographic", _) => {}
            ("daemonize", _) => out.daemonize = true,
            ("machine", Some(v)) => machine = Some(parse_machine(v)?),
            ("qmp", Some(v)) => qmp = Some(parse_qmp(v)?),
            ("pidfile", Some(v)) => out.pidfile = Some(v.to_owned()),
            _ => unreachable!("every option in OPTIONS is handled"),
        }
    }
    machine.ok_or(QemuArgvError::Required("machine"))?;
    out.qmp = qmp.ok_or(QemuArgvError::Required("qmp"))?;
    Ok(out)
}

/// `-machine [type=]TYPE[,accel=A:B...]`: only `none`, on KVM.
fn parse_machine(v: &str) -> Result<(), QemuArgvError> {
    let mut ty = None;
    for (i, part) in v.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 => ty = Some(part),
            Some(("type", t)) => ty = Some(t),
            Some(("accel", list)) => {
                if !list.split(':').any(|a| a == "kvm") {
                    return Err(invalid(
                        "machine",
                        format!("accel={list}: Ferry runs on kvm only"),
                    ));
                }
            }
            _ => return Err(invalid("machine", format!("unsupported property '{part}'"))),
        }
    }
    match ty {
        Some("none") => Ok(()),
        Some(t) => Err(invalid(
            "machine",
            format!("machine type '{t}': only 'none' (a probe process) is supported so far"),
        )),
        None => Err(invalid("machine", "no machine type")),
    }
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
                qmp: "/run/q.monitor".into(),
                pidfile: Some("/run/q.pid".into()),
                daemonize: true,
            }
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
            "Option '-machine': machine type 'pc-q35-7.2': only 'none' (a probe process) is supported so far"
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
    }
}
