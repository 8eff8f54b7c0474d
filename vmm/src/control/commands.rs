//! The one table of QMP commands: `query-commands` lists it and `execute` dispatches through it,
//! so a command cannot be advertised without a handler or handled without being advertised.

use super::Controller;
use crate::qmp::{Args, QmpError};
use serde_json::{Map, Value, json};
use std::sync::Arc;

type Arguments = Map<String, Value>;

/// A QMP command: its wire name and the handler that checks its arguments and runs it.
pub(super) struct Command {
    pub(super) name: &'static str,
    pub(super) run: fn(&Arc<Controller>, Arguments) -> Result<Value, QmpError>,
}

/// Refuse any argument (commands that take none).
fn no_args(a: Arguments) -> Result<(), QmpError> {
    Args::new(a).finish()
}

/// Every command Ferry answers, in `query-commands` order.
pub(super) const COMMANDS: &[Command] = &[
    Command {
        name: "query-status",
        run: |c, a| {
            no_args(a)?;
            let s = c.run_state();
            Ok(json!({"running": s.is_running(), "singlestep": false, "status": s.as_str()}))
        },
    },
    Command {
        name: "stop",
        run: |c, a| {
            no_args(a)?;
            c.stop()
        },
    },
    Command {
        name: "cont",
        run: |c, a| {
            no_args(a)?;
            c.cont_inner()
        },
    },
    Command {
        name: "quit",
        run: |c, a| {
            no_args(a)?;
            c.quit()
        },
    },
    Command {
        name: "query-machines",
        run: |c, a| {
            let mut a = Args::new(a);
            let _ = a.optional_bool("compat-props")?;
            a.finish()?;
            Ok(c.query_machines())
        },
    },
    Command {
        name: "query-cpu-definitions",
        run: |c, a| {
            no_args(a)?;
            Ok(c.query_cpu_definitions())
        },
    },
    Command {
        name: "query-hotpluggable-cpus",
        run: |c, a| {
            no_args(a)?;
            Ok(c.query_hotpluggable_cpus())
        },
    },
    Command {
        name: "migrate",
        run: |c, a| c.migrate(a),
    },
    Command {
        name: "migrate-incoming",
        run: |c, a| c.migrate_incoming(a),
    },
    Command {
        name: "migrate_cancel",
        run: |c, a| {
            no_args(a)?;
            c.migrate_cancel()
        },
    },
    Command {
        name: "migrate-recover",
        run: |c, a| c.migrate_recover(a),
    },
    Command {
        name: "migrate-start-postcopy",
        run: |c, a| {
            no_args(a)?;
            c.start_postcopy()
        },
    },
    Command {
        name: "query-migrate",
        run: |c, a| {
            no_args(a)?;
            Ok(c.query_migrate())
        },
    },
    Command {
        name: "migrate-set-capabilities",
        run: |c, a| c.set_capabilities(a),
    },
    Command {
        name: "query-migrate-capabilities",
        run: |c, a| {
            no_args(a)?;
            Ok(c.query_capabilities())
        },
    },
    Command {
        name: "object-add",
        run: |c, a| c.object_add(a),
    },
    Command {
        name: "object-del",
        run: |c, a| c.object_del(a),
    },
    Command {
        name: "__org.ferry_query-objects",
        run: |c, a| {
            no_args(a)?;
            Ok(c.query_objects())
        },
    },
    Command {
        name: "migrate-set-parameters",
        run: |c, a| c.set_parameters(a),
    },
    Command {
        name: "query-migrate-parameters",
        run: |c, a| {
            no_args(a)?;
            Ok(c.query_parameters())
        },
    },
    Command {
        name: "__org.ferry_query-guest",
        run: |c, a| {
            no_args(a)?;
            c.query_guest()
        },
    },
    Command {
        name: "__org.ferry_verify-guest",
        run: |c, a| {
            no_args(a)?;
            c.verify_guest()
        },
    },
    Command {
        name: "device_add",
        run: |c, a| c.device_add(a),
    },
    Command {
        name: "device_del",
        run: |c, a| c.device_del(a),
    },
    Command {
        name: "__org.ferry_query-connectors",
        run: |c, a| {
            no_args(a)?;
            Ok(c.query_connectors())
        },
    },
    Command {
        name: "__org.ferry_guest-hotplug",
        run: |c, a| c.guest_hotplug(a),
    },
];

#[cfg(test)]
mod tests {
    use super::COMMANDS;
    use std::collections::BTreeSet;

    #[test]
    fn command_names_are_unique() {
        let names: BTreeSet<_> = COMMANDS.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), COMMANDS.len(), "a command is listed twice");
    }
}
