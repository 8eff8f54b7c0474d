//! The guest-facing hotplug controller: a small port-I/O register file in front of the
//! connectors and the pending-event queue.
//!
//! Base port [`CONTROLLER_BASE`] (0x5a0), [`CONTROLLER_LEN`] (0x20) ports, outside the ranges
//! the in-kernel PIC/PIT, the UART and the progress port use. All registers are 32 bits wide,
//! little-endian; an access that is not 4 bytes at a 4-byte-aligned offset reads as all ones
//! and writes nothing.
//!
//! | offset | name       | access | meaning |
//! |--------|------------|--------|---------|
//! | 0x00   | EVENT      | R      | pops the oldest pending event into the latch and returns its connector index; 0 when the queue is empty (no connector index is 0) |
//! | 0x04   | EVENT_KIND | R      | kind of the latched event: 0 none, 1 hotplug (configure it), 2 unplug (release it) |
//! | 0x08   | SELECTOR   | RW     | connector index the next operation acts on |
//! | 0x0C   | ARG        | RW     | argument of the next operation |
//! | 0x10   | OP         | W / R  | write an op code to run it on SELECTOR with ARG; reads back the last op code |
//! | 0x14   | STATUS     | R      | RTAS status of the last op, as i32: 0 success; -1 hardware error; -3 no such indicator / parameter error; -9003 not configurable; for CONFIGURE also 2 next-child, 3 next-property, 4 prev-parent (0 = done, connector configured) |
//! | 0x18   | VALUE      | R      | GET_SENSOR: the sensor value (entity sense 0 empty, 1 present, 2 unusable); CONFIGURE: the cursor after the step; otherwise 0 |
//! | 0x1C   | PENDING    | R      | number of pending events (does not pop) |
//!
//! Op codes (OP register):
//!
//! | code | op | ARG |
//! |------|----|-----|
//! | 1 | SET_ISOLATION (`set-indicator` 9001) | 0 isolate, 1 unisolate |
//! | 2 | SET_ALLOCATION (`set-indicator` 9003, logical only) | 0 unusable, 1 usable |
//! | 3 | SET_DR_INDICATOR (`set-indicator` 9002, physical only) | 0 inactive, 1 active, 2 identify, 3 action |
//! | 4 | GET_SENSOR (`get-sensor-state`) | sensor token, 9003 = dr-entity-sense |
//! | 5 | CONFIGURE (`ibm,configure-connector`, one step) | ignored |
//!
//! Any other op code sets STATUS to -3 and changes nothing. A SELECTOR that names no
//! connector gives -3 for SET_* (no such indicator), -3 for GET_SENSOR (parameter error) and
//! -9003 for CONFIGURE, as QEMU does.
//!
//! Interrupt: the controller asks for an interrupt each time an event is queued (the VMM
//! polls [`HotplugManager::take_irq`](super::manager::HotplugManager::take_irq) and signals
//! an irqfd). The guest's handler reads EVENT until it returns 0.
//!
//! Guest sequence for a hot-added CPU core: EVENT -> index, EVENT_KIND = 1; SELECTOR=index;
//! ARG=1 OP=2 (usable); ARG=1 OP=1 (unisolate); OP=5 until STATUS = 0. For an unplug of a
//! logical connector: ARG=0 OP=1 (isolate), ARG=0 OP=2 (unusable); of a PCI function:
//! ARG=0 OP=1 (isolate).

use crate::connector::Outcome;
use crate::events::GuestEvent;
use crate::papr::{GuestOp, RtasError, token};
use crate::persist::ControllerState;

/// First port of the controller.
pub const CONTROLLER_BASE: u16 = 0x5a0;
/// Number of ports.
pub const CONTROLLER_LEN: u16 = 0x20;

/// Register offsets.
pub mod reg {
    /// Pop the next event (returns its connector index, 0 if none).
    pub const EVENT: u16 = 0x00;
    /// Kind of the latched event.
    pub const EVENT_KIND: u16 = 0x04;
    /// Connector index for the next op.
    pub const SELECTOR: u16 = 0x08;
    /// Argument for the next op.
    pub const ARG: u16 = 0x0c;
    /// Op code (write runs it).
    pub const OP: u16 = 0x10;
    /// RTAS status of the last op.
    pub const STATUS: u16 = 0x14;
    /// Value returned by the last op.
    pub const VALUE: u16 = 0x18;
    /// Pending event count.
    pub const PENDING: u16 = 0x1c;
}

/// Op codes.
pub mod op {
    /// set-indicator(isolation).
    pub const SET_ISOLATION: u32 = 1;
    /// set-indicator(allocation).
    pub const SET_ALLOCATION: u32 = 2;
    /// set-indicator(dr-indicator).
    pub const SET_DR_INDICATOR: u32 = 3;
    /// get-sensor-state.
    pub const GET_SENSOR: u32 = 4;
    /// configure-connector step.
    pub const CONFIGURE: u32 = 5;
}

/// What the register file needs from the hotplug core.
pub trait ControllerBackend {
    /// Pop the oldest pending guest event.
    fn pop_event(&mut self) -> Option<GuestEvent>;
    /// Number of pending guest events.
    fn pending_events(&self) -> usize;
    /// Run a guest operation on connector `index`, with its side effects.
    fn guest_op(&mut self, index: u32, op: GuestOp) -> Result<Outcome, RtasError>;
    /// Configure-connector cursor of connector `index` (reported in VALUE).
    fn cc_cursor(&self, index: u32) -> u8;
}

/// Decode an op code and argument into a guest operation.
pub fn decode_op(code: u32, arg: u32) -> Option<GuestOp> {
    match code {
        op::SET_ISOLATION => Some(GuestOp::SetIndicator {
            token: token::ISOLATION_STATE,
            value: arg,
        }),
        op::SET_ALLOCATION => Some(GuestOp::SetIndicator {
            token: token::ALLOCATION_STATE,
            value: arg,
        }),
        op::SET_DR_INDICATOR => Some(GuestOp::SetIndicator {
            token: token::DR_INDICATOR,
            value: arg,
        }),
        op::GET_SENSOR => Some(GuestOp::GetSensorState { token: arg }),
        op::CONFIGURE => Some(GuestOp::ConfigureConnector),
        _ => None,
    }
}

/// The register file. Its values are guest-visible state (a guest may be stopped between
/// writing OP and reading STATUS), so they are migrated as section `hotplug-controller`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controller {
    selector: u32,
    arg: u32,
    last_op: u32,
    status: i32,
    value: u32,
    event_index: u32,
    event_kind: u32,
}

impl Controller {
    /// Registers at reset.
    pub fn new() -> Controller {
        Controller::default()
    }

    /// Guest read of `data.len()` bytes at `offset` from [`CONTROLLER_BASE`].
    pub fn pio_read(&mut self, be: &mut dyn ControllerBackend, offset: u16, data: &mut [u8]) {
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!(
                offset,
                len = data.len(),
                "hotplug controller: bad read width"
            );
            data.fill(0xff);
            return;
        }
        let v: u32 = match offset {
            reg::EVENT => {
                match be.pop_event() {
                    Some(ev) => {
                        self.event_index = ev.index;
                        self.event_kind = u32::from(ev.kind.wire());
                    }
                    None => {
                        self.event_index = 0;
                        self.event_kind = 0;
                    }
                }
                self.event_index
            }
            reg::EVENT_KIND => self.event_kind,
            reg::SELECTOR => self.selector,
            reg::ARG => self.arg,
            reg::OP => self.last_op,
            reg::STATUS => self.status as u32,
            reg::VALUE => self.value,
            reg::PENDING => u32::try_from(be.pending_events()).unwrap_or(u32::MAX),
            _ => u32::MAX,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Guest write of `data` at `offset` from [`CONTROLLER_BASE`].
    pub fn pio_write(&mut self, be: &mut dyn ControllerBackend, offset: u16, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                offset,
                len = data.len(),
                "hotplug controller: bad write width"
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::SELECTOR => self.selector = v,
            reg::ARG => self.arg = v,
            reg::OP => self.run(be, v),
            _ => tracing::debug!(offset, "hotplug controller: write to a read-only register"),
        }
    }

    fn run(&mut self, be: &mut dyn ControllerBackend, code: u32) {
        self.last_op = code;
        self.value = 0;
        let Some(gop) = decode_op(code, self.arg) else {
            self.status = RtasError::ParamError.code();
            return;
        };
        match be.guest_op(self.selector, gop) {
            Ok(out) => {
                self.status = out.status();
                match out {
                    Outcome::Sensor(s) => self.value = s as u32,
                    Outcome::ConfigureStep(_) | Outcome::Configured => {
                        self.value = u32::from(be.cc_cursor(self.selector));
                    }
                    _ => {}
                }
            }
            Err(e) => self.status = e.code(),
        }
    }

    /// The migrated form.
    pub fn to_state(&self) -> ControllerState {
        ControllerState {
            selector: self.selector,
            arg: self.arg,
            last_op: self.last_op,
            status: self.status,
            value: self.value,
            event_index: self.event_index,
            event_kind: self.event_kind,
        }
    }

    /// Rebuild from the migrated form.
    pub fn restore(&mut self, s: &ControllerState) {
        *self = Controller {
            selector: s.selector,
            arg: s.arg,
            last_op: s.last_op,
            status: s.status,
            value: s.value,
            event_index: s.event_index,
            event_kind: s.event_kind,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::Connector;
    use crate::events::{EventQueue, GuestEventKind};
    use crate::papr::{ConnectorKind, EntitySense};

    /// One CPU connector and a queue, without the manager.
    struct Mock {
        conn: Connector,
        q: EventQueue,
    }

    impl ControllerBackend for Mock {
        fn pop_event(&mut self) -> Option<GuestEvent> {
            self.q.pop()
        }
        fn pending_events(&self) -> usize {
            self.q.len()
        }
        fn guest_op(&mut self, index: u32, op: GuestOp) -> Result<Outcome, RtasError> {
            if index == self.conn.index() {
                self.conn.apply(op)
            } else {
                Err(RtasError::NoSuchIndicator)
            }
        }
        fn cc_cursor(&self, _index: u32) -> u8 {
            self.conn.cc_cursor()
        }
    }

    fn rd(c: &mut Controller, m: &mut Mock, off: u16) -> u32 {
        let mut b = [0u8; 4];
        c.pio_read(m, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(c: &mut Controller, m: &mut Mock, off: u16, v: u32) {
        c.pio_write(m, off, &v.to_le_bytes());
    }

    fn mock() -> Mock {
        let mut conn = Connector::new(ConnectorKind::CpuCore, 2);
        conn.attach(crate::connector::AttachedDevice {
            id: "cpu2".into(),
            multifunction: false,
        });
        let mut q = EventQueue::new();
        q.push(GuestEvent {
            index: conn.index(),
            kind: GuestEventKind::Hotplug,
        })
        .unwrap();
        Mock { conn, q }
    }

    #[test]
    fn event_register_pops_into_latch() {
        let (mut c, mut m) = (Controller::new(), mock());
        assert_eq!(rd(&mut c, &mut m, reg::PENDING), 1);
        assert_eq!(rd(&mut c, &mut m, reg::EVENT), 0x1000_0002);
        assert_eq!(rd(&mut c, &mut m, reg::EVENT_KIND), 1);
        assert_eq!(rd(&mut c, &mut m, reg::PENDING), 0);
        assert_eq!(rd(&mut c, &mut m, reg::EVENT), 0);
        assert_eq!(rd(&mut c, &mut m, reg::EVENT_KIND), 0);
    }

    #[test]
    fn hot_add_sequence_through_registers() {
        let (mut c, mut m) = (Controller::new(), mock());
        wr(&mut c, &mut m, reg::SELECTOR, 0x1000_0002);
        wr(&mut c, &mut m, reg::ARG, 9003);
        wr(&mut c, &mut m, reg::OP, op::GET_SENSOR);
        assert_eq!(rd(&mut c, &mut m, reg::STATUS), 0);
        assert_eq!(rd(&mut c, &mut m, reg::VALUE), EntitySense::Unusable as u32);
        // unisolate before usable: -3
        wr(&mut c, &mut m, reg::ARG, 1);
        wr(&mut c, &mut m, reg::OP, op::SET_ISOLATION);
        assert_eq!(rd(&mut c, &mut m, reg::STATUS) as i32, -3);
        wr(&mut c, &mut m, reg::OP, op::SET_ALLOCATION);
        assert_eq!(rd(&mut c, &mut m, reg::STATUS), 0);
        wr(&mut c, &mut m, reg::OP, op::SET_ISOLATION);
        assert_eq!(rd(&mut c, &mut m, reg::STATUS), 0);
        let mut statuses = Vec::new();
        loop {
            wr(&mut c, &mut m, reg::OP, op::CONFIGURE);
            let st = rd(&mut c, &mut m, reg::STATUS) as i32;
            statuses.push(st);
            if st <= 0 {
                break;
            }
        }
        assert_eq!(statuses, [2, 3, 3, 3, 2, 3, 4, 0]);
        assert_eq!(rd(&mut c, &mut m, reg::VALUE), 0);
        assert_eq!(rd(&mut c, &mut m, reg::OP), op::CONFIGURE);
        assert_eq!(rd(&mut c, &mut m, reg::SELECTOR), 0x1000_0002);
        assert_eq!(rd(&mut c, &mut m, reg::ARG), 1);
        // configure on a configured connector restarts the walk (repeat allowed)
        wr(&mut c, &mut m, reg::OP, op::CONFIGURE);
        assert_eq!(rd(&mut c, &mut m, reg::STATUS), 2);
        assert_eq!(rd(&mut c, &mut m, reg::VALUE), 1);
    }

    #[test]
    fn errors_unknown_op_bad_selector_bad_width() {
        let (mut c, mut m) = (Controller::new(), mock());
        wr(&mut c, &mut m, reg::OP, 99);
        assert_eq!(rd(&mut c, &mut m, reg::STATUS) as i32, -3);
        wr(&mut c, &mut m, reg::SELECTOR, 0x1000_0007);
        wr(&mut c, &mut m, reg::OP, op::SET_ISOLATION);
        assert_eq!(rd(&mut c, &mut m, reg::STATUS) as i32, -3);
        let before = c;
        // 2-byte accesses: reads as all ones, writes ignored, no pop
        let mut b = [0u8; 2];
        c.pio_read(&mut m, reg::EVENT, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        c.pio_write(&mut m, reg::SELECTOR, &[1, 2]);
        let mut b4 = [0u8; 4];
        c.pio_read(&mut m, 0x02, &mut b4);
        assert_eq!(b4, [0xff; 4]);
        assert_eq!(c, before);
        assert_eq!(m.q.len(), 1);
        // read-only register writes are ignored; out-of-range reads are all ones
        wr(&mut c, &mut m, reg::STATUS, 5);
        assert_eq!(c, before);
        assert_eq!(rd(&mut c, &mut m, 0x40), u32::MAX);
    }

    #[test]
    fn state_round_trip() {
        let (mut c, mut m) = (Controller::new(), mock());
        wr(&mut c, &mut m, reg::SELECTOR, 0x1000_0002);
        wr(&mut c, &mut m, reg::ARG, 7);
        rd(&mut c, &mut m, reg::EVENT);
        wr(&mut c, &mut m, reg::OP, op::SET_ALLOCATION);
        let mut d = Controller::new();
        d.restore(&c.to_state());
        assert_eq!(c, d);
    }
}
