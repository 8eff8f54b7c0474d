//! One hotplug connector (a PAPR Dynamic Reconfiguration Connector, DRC) and its state machine.
//!
//! The model follows QEMU's unified DRC state machine (`hw/ppc/spapr_drc.c`): a single
//! [`DrcState`] whose wire values are LoPAPR's (0 invalid, 1..=4 logical, 5..=8 physical).
//! Isolation and allocation are projections of that state (as in QEMU since 2.11), the DR
//! indicator is stored separately (physical connectors only).
//!
//! Every guest operation goes through [`Connector::apply`], the one transition function.
//! Management operations (attach, unplug request, timeout, reset) are separate methods so the
//! guest can never trigger them. Release of a device after a completed unplug is two-step:
//! the guest's last step moves the connector to *release-pending* (a consistent state that is
//! migrated by every machine type) and whoever runs the guest afterwards calls
//! [`Connector::complete_release`] (Precise rule 3).

use super::persist::{ABSENT, ConnectorState};

/// PAPR type shift of CPU-core connectors (`index = 1 << 28 | core_id`).
pub const TYPE_SHIFT_CPU: u32 = 1;
/// PAPR type shift of PCI connectors (`index = 4 << 28 | devfn`).
pub const TYPE_SHIFT_PCI: u32 = 4;
/// PAPR type shift of memory-block (LMB) connectors (`index = 8 << 28 | slot`).
pub const TYPE_SHIFT_LMB: u32 = 8;
/// Largest connector id (the low 28 bits of the index).
pub const MAX_CONNECTOR_ID: u32 = (1 << 28) - 1;
/// Longest device id a connector (and its migrated state) carries, in bytes.
pub const DEVICE_ID_MAX: usize = 64;

/// RTAS indicator and sensor tokens (LoPAPR; QEMU `RTAS_SENSOR_TYPE_*`).
pub mod token {
    /// `set-indicator` isolation-state indicator.
    pub const ISOLATION_STATE: u32 = 9001;
    /// `set-indicator` DR indicator (physical connectors).
    pub const DR_INDICATOR: u32 = 9002;
    /// `set-indicator` allocation-state indicator (logical connectors).
    pub const ALLOCATION_STATE: u32 = 9003;
    /// `get-sensor-state` dr-entity-sense sensor (same number as allocation state).
    pub const ENTITY_SENSE: u32 = 9003;
}

/// What a connector connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConnectorKind {
    /// A CPU core (logical connector).
    CpuCore,
    /// A 16 MiB memory block, an LMB (logical connector).
    MemBlock,
    /// One PCI function (physical connector).
    PciFn,
}

impl ConnectorKind {
    /// All kinds.
    pub const ALL: [ConnectorKind; 3] = [
        ConnectorKind::CpuCore,
        ConnectorKind::MemBlock,
        ConnectorKind::PciFn,
    ];

    /// The PAPR type shift (the top four bits of the index).
    pub const fn type_shift(self) -> u32 {
        match self {
            ConnectorKind::CpuCore => TYPE_SHIFT_CPU,
            ConnectorKind::MemBlock => TYPE_SHIFT_LMB,
            ConnectorKind::PciFn => TYPE_SHIFT_PCI,
        }
    }

    /// Whether this is a physical connector (PCI); the others are logical.
    pub const fn is_physical(self) -> bool {
        matches!(self, ConnectorKind::PciFn)
    }

    /// State of an empty connector (`empty_state` in QEMU).
    pub const fn empty_state(self) -> DrcState {
        if self.is_physical() {
            DrcState::PhysicalPowerOn
        } else {
            DrcState::LogicalUnusable
        }
    }

    /// State after a successful configure-connector (`ready_state` in QEMU), which is also the
    /// reset state of a connector with a device.
    pub const fn ready_state(self) -> DrcState {
        if self.is_physical() {
            DrcState::PhysicalConfigured
        } else {
            DrcState::LogicalConfigured
        }
    }

    /// Short name used in queries: `cpu-core`, `mem-block`, `pci-fn`.
    pub const fn name(self) -> &'static str {
        match self {
            ConnectorKind::CpuCore => "cpu-core",
            ConnectorKind::MemBlock => "mem-block",
            ConnectorKind::PciFn => "pci-fn",
        }
    }

    /// The `device_add` driver that plugs into this kind.
    pub const fn driver(self) -> &'static str {
        match self {
            ConnectorKind::CpuCore => "ferry-cpu-core",
            ConnectorKind::MemBlock => "ferry-mem-block",
            ConnectorKind::PciFn => "ferry-pci-fn",
        }
    }

    /// PAPR index `type << 28 | id`; `id` must be at most [`MAX_CONNECTOR_ID`].
    pub const fn index(self, id: u32) -> u32 {
        (self.type_shift() << 28) | (id & MAX_CONNECTOR_ID)
    }

    /// Split an index into kind and id; `None` for a type this VMM does not implement.
    pub const fn from_index(index: u32) -> Option<(ConnectorKind, u32)> {
        let id = index & MAX_CONNECTOR_ID;
        match index >> 28 {
            TYPE_SHIFT_CPU => Some((ConnectorKind::CpuCore, id)),
            TYPE_SHIFT_PCI => Some((ConnectorKind::PciFn, id)),
            TYPE_SHIFT_LMB => Some((ConnectorKind::MemBlock, id)),
            _ => None,
        }
    }

    /// The fragment a configure-connector walk returns, one response per call, ending in
    /// SUCCESS. It stands for the device-tree fragment QEMU builds lazily; its shape is fixed
    /// per kind, so a migrated cursor means the same position on both sides.
    pub const fn configure_script(self) -> &'static [CcResponse] {
        use CcResponse::{NextChild as C, NextProperty as P, PrevParent as U, Success as S};
        match self {
            // cpus/PowerPC,POWER@N { reg; device_type; ibm,my-drc-index; l2-cache { reg } }
            ConnectorKind::CpuCore => &[C, P, P, P, C, P, U, S],
            // ibm,dynamic-memory-block@N { reg; device_type; ibm,my-drc-index }
            ConnectorKind::MemBlock => &[C, P, P, P, S],
            // pci@S,F { vendor-id; device-id; reg; ibm,my-drc-index }
            ConnectorKind::PciFn => &[C, P, P, P, P, S],
        }
    }
}

/// The unified DRC state. Discriminants are the LoPAPR/QEMU wire values: they are exposed in
/// the migration stream, never change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum DrcState {
    /// Never a valid state; only exists so 0 on the wire is recognisably wrong.
    Invalid = 0,
    /// Logical: no resource, or not allocated to the guest.
    LogicalUnusable = 1,
    /// Logical: allocated (allocation USABLE), isolated.
    LogicalAvailable = 2,
    /// Logical: unisolated, configure-connector may run.
    LogicalUnisolate = 3,
    /// Logical: configured, in use by the guest.
    LogicalConfigured = 4,
    /// Physical: defined by LoPAPR, never used (as in QEMU).
    PhysicalAvailable = 5,
    /// Physical: powered on, isolated (also the empty state).
    PhysicalPowerOn = 6,
    /// Physical: unisolated, configure-connector may run.
    PhysicalUnisolate = 7,
    /// Physical: configured, in use by the guest.
    PhysicalConfigured = 8,
}

impl DrcState {
    /// All values in wire order.
    pub const ALL: [DrcState; 9] = [
        DrcState::Invalid,
        DrcState::LogicalUnusable,
        DrcState::LogicalAvailable,
        DrcState::LogicalUnisolate,
        DrcState::LogicalConfigured,
        DrcState::PhysicalAvailable,
        DrcState::PhysicalPowerOn,
        DrcState::PhysicalUnisolate,
        DrcState::PhysicalConfigured,
    ];

    /// The wire value.
    pub const fn wire(self) -> u8 {
        self as u8
    }

    /// Parse a wire value (0..=8); anything else is `None`.
    pub fn from_wire(v: u8) -> Option<DrcState> {
        DrcState::ALL.get(usize::from(v)).copied()
    }

    /// Name used in queries and logs, e.g. `logical-configured`.
    pub const fn name(self) -> &'static str {
        match self {
            DrcState::Invalid => "invalid",
            DrcState::LogicalUnusable => "logical-unusable",
            DrcState::LogicalAvailable => "logical-available",
            DrcState::LogicalUnisolate => "logical-unisolate",
            DrcState::LogicalConfigured => "logical-configured",
            DrcState::PhysicalAvailable => "physical-available",
            DrcState::PhysicalPowerOn => "physical-poweron",
            DrcState::PhysicalUnisolate => "physical-unisolate",
            DrcState::PhysicalConfigured => "physical-configured",
        }
    }

    /// Whether a connector of `kind` may be in this state. `Invalid` and the unused
    /// `PhysicalAvailable` are never valid.
    pub const fn valid_for(self, kind: ConnectorKind) -> bool {
        match self {
            DrcState::LogicalUnusable
            | DrcState::LogicalAvailable
            | DrcState::LogicalUnisolate
            | DrcState::LogicalConfigured => !kind.is_physical(),
            DrcState::PhysicalPowerOn
            | DrcState::PhysicalUnisolate
            | DrcState::PhysicalConfigured => kind.is_physical(),
            DrcState::Invalid | DrcState::PhysicalAvailable => false,
        }
    }
}

/// Isolation-state indicator values (token 9001).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Isolation {
    /// Isolated from the guest.
    Isolated = 0,
    /// Unisolated (the guest may configure and use it).
    Unisolated = 1,
}

impl Isolation {
    /// Parse a wire value.
    pub const fn from_wire(v: u32) -> Option<Isolation> {
        match v {
            0 => Some(Isolation::Isolated),
            1 => Some(Isolation::Unisolated),
            _ => None,
        }
    }

    /// Name used in queries.
    pub const fn name(self) -> &'static str {
        match self {
            Isolation::Isolated => "isolated",
            Isolation::Unisolated => "unisolated",
        }
    }
}

/// Allocation-state indicator values (token 9003). LoPAPR also defines EXCHANGE (2) and
/// RECOVER (3); like QEMU, they are refused with a parameter error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Allocation {
    /// Not allocated to the guest.
    Unusable = 0,
    /// Allocated to the guest.
    Usable = 1,
}

impl Allocation {
    /// Parse a wire value.
    pub const fn from_wire(v: u32) -> Option<Allocation> {
        match v {
            0 => Some(Allocation::Unusable),
            1 => Some(Allocation::Usable),
            _ => None,
        }
    }

    /// Name used in queries.
    pub const fn name(self) -> &'static str {
        match self {
            Allocation::Unusable => "unusable",
            Allocation::Usable => "usable",
        }
    }
}

/// DR indicator values (token 9002), physical connectors only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DrIndicator {
    /// Off.
    Inactive = 0,
    /// On.
    Active = 1,
    /// Blinking: identify the slot.
    Identify = 2,
    /// Blinking: a power transition / operator action is in progress.
    Action = 3,
}

impl DrIndicator {
    /// Parse a wire value (0..=3).
    pub const fn from_wire(v: u32) -> Option<DrIndicator> {
        match v {
            0 => Some(DrIndicator::Inactive),
            1 => Some(DrIndicator::Active),
            2 => Some(DrIndicator::Identify),
            3 => Some(DrIndicator::Action),
            _ => None,
        }
    }

    /// Whether the indicator blinks (IDENTIFY or ACTION): the guest is mid-transition and no
    /// card may be inserted (seed 000).
    pub const fn is_blinking(self) -> bool {
        matches!(self, DrIndicator::Identify | DrIndicator::Action)
    }

    /// Name used in queries.
    pub const fn name(self) -> &'static str {
        match self {
            DrIndicator::Inactive => "inactive",
            DrIndicator::Active => "active",
            DrIndicator::Identify => "identify",
            DrIndicator::Action => "action",
        }
    }
}

/// dr-entity-sense sensor values (token 9003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntitySense {
    /// Physical connector without a device.
    Empty = 0,
    /// A resource is present.
    Present = 1,
    /// Logical connector in the UNUSABLE state.
    Unusable = 2,
}

/// Responses of configure-connector (`SPAPR_DR_CC_RESPONSE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CcResponse {
    /// The walk is complete; the connector is in its ready state.
    Success,
    /// Descend into a child node.
    NextChild,
    /// Next property of the current node.
    NextProperty,
    /// Back up to the parent node.
    PrevParent,
}

impl CcResponse {
    /// The RTAS status value.
    pub const fn code(self) -> i32 {
        match self {
            CcResponse::Success => 0,
            CcResponse::NextChild => 2,
            CcResponse::NextProperty => 3,
            CcResponse::PrevParent => 4,
        }
    }
}

/// RTAS-like failure of a guest operation. Several share a numeric code (as in QEMU, where
/// `RTAS_OUT_PARAM_ERROR`, `RTAS_OUT_NO_SUCH_INDICATOR` and `RTAS_OUT_NOT_SUPPORTED` are
/// all -3), so the variant says why and [`RtasError::code`] what the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RtasError {
    /// `RTAS_OUT_HW_ERROR` (-1): refused by the platform (LMB isolate without a pending
    /// unplug; a late isolate/release after the unplug timed out).
    #[error("RTAS hardware error (-1)")]
    HwError,
    /// `RTAS_OUT_NO_SUCH_INDICATOR` (-3): no such indicator on this connector, or the
    /// indicator cannot take that state now.
    #[error("RTAS no such indicator (-3)")]
    NoSuchIndicator,
    /// `RTAS_OUT_PARAM_ERROR` (-3): bad value, or a transition LoPAPR forbids.
    #[error("RTAS parameter error (-3)")]
    ParamError,
    /// `SPAPR_DR_CC_RESPONSE_NOT_CONFIGURABLE` (-9003).
    #[error("RTAS connector not configurable (-9003)")]
    NotConfigurable,
}

impl RtasError {
    /// The status value the guest reads.
    pub const fn code(self) -> i32 {
        match self {
            RtasError::HwError => -1,
            RtasError::NoSuchIndicator | RtasError::ParamError => -3,
            RtasError::NotConfigurable => -9003,
        }
    }
}

/// A guest (RTAS-like) operation on one connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestOp {
    /// `set-indicator(token, value)`.
    SetIndicator {
        /// Indicator token ([`token`]).
        token: u32,
        /// New value.
        value: u32,
    },
    /// `get-sensor-state(token)`.
    GetSensorState {
        /// Sensor token; only [`token::ENTITY_SENSE`] exists.
        token: u32,
    },
    /// `ibm,configure-connector`: one step of the walk.
    ConfigureConnector,
}

impl GuestOp {
    /// set-indicator(isolation, ISOLATED).
    pub const ISOLATE: GuestOp = GuestOp::SetIndicator {
        token: token::ISOLATION_STATE,
        value: Isolation::Isolated as u32,
    };
    /// set-indicator(isolation, UNISOLATED).
    pub const UNISOLATE: GuestOp = GuestOp::SetIndicator {
        token: token::ISOLATION_STATE,
        value: Isolation::Unisolated as u32,
    };
    /// set-indicator(allocation, USABLE).
    pub const SET_USABLE: GuestOp = GuestOp::SetIndicator {
        token: token::ALLOCATION_STATE,
        value: Allocation::Usable as u32,
    };
    /// set-indicator(allocation, UNUSABLE).
    pub const SET_UNUSABLE: GuestOp = GuestOp::SetIndicator {
        token: token::ALLOCATION_STATE,
        value: Allocation::Unusable as u32,
    };
    /// get-sensor-state(dr-entity-sense).
    pub const ENTITY_SENSE: GuestOp = GuestOp::GetSensorState {
        token: token::ENTITY_SENSE,
    };

    /// set-indicator(dr-indicator, v).
    pub const fn dr_indicator(v: DrIndicator) -> GuestOp {
        GuestOp::SetIndicator {
            token: token::DR_INDICATOR,
            value: v as u32,
        }
    }
}

/// What a successful guest operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Accepted (state changed, or nothing to do).
    Done,
    /// The guest completed a requested unplug: the connector is now release-pending and the
    /// device must be released (now, or by whichever side runs the guest after a migration).
    UnplugCompleted,
    /// The guest refused a requested unplug (logical UNISOLATE while unplug is requested):
    /// the request is cleared; DEVICE_UNPLUG_GUEST_ERROR must be emitted.
    UnplugRejected,
    /// Value of the requested sensor.
    Sensor(EntitySense),
    /// One configure-connector step that did not change the state (a walk in progress, or a
    /// repeated walk on a configured connector).
    ConfigureStep(CcResponse),
    /// configure-connector finished (SUCCESS) and moved the connector to its ready state.
    Configured,
}

impl Outcome {
    /// The RTAS status the guest reads for this outcome.
    pub const fn status(self) -> i32 {
        match self {
            Outcome::ConfigureStep(r) => r.code(),
            _ => 0,
        }
    }
}

/// A device attached to a connector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttachedDevice {
    /// The `device_add` id.
    pub id: String,
    /// PCI only: the function was added with `multifunction=on`.
    pub multifunction: bool,
}

/// Why a connector refuses a new device for now (a transient condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BusyReason {
    /// An unplug request waits for the guest.
    UnplugPending,
    /// The guest completed an unplug during a migration; the release has not run yet.
    ReleasePending,
    /// The guest is blinking the DR indicator (power transition / identify).
    IndicatorBlinking,
    /// The guest is half-way through configuring or isolating the connector.
    Configuring,
}

impl BusyReason {
    /// Wording used in errors: `connector 0x... is busy (unplug pending)`.
    pub const fn describe(self) -> &'static str {
        match self {
            BusyReason::UnplugPending => "unplug pending",
            BusyReason::ReleasePending => "release pending",
            BusyReason::IndicatorBlinking => "indicator blinking",
            BusyReason::Configuring => "guest is configuring it",
        }
    }
}

/// Result of a management unplug request on one connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnplugRequest {
    /// The request is now pending; the guest must be told.
    AwaitingGuest,
    /// A request was already pending; its deadline is kept (Precise rule 4).
    AlreadyPending,
    /// The connector was in its empty state (the guest never took the device): released now.
    Released(AttachedDevice),
}

/// Why a migrated connector state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connector {index:#010x}: {why}")]
pub struct RestoreError {
    /// Connector index.
    pub index: u32,
    /// What is wrong.
    pub why: String,
}

/// One hotplug connector (runtime structure; its migrated form is [`ConnectorState`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connector {
    kind: ConnectorKind,
    id: u32,
    state: DrcState,
    dr_indicator: DrIndicator,
    cc_cursor: u8,
    device: Option<AttachedDevice>,
    unplug_requested: bool,
    unplug_deadline_ms: Option<u64>,
    unplug_timed_out: bool,
    release_pending: bool,
}

impl Connector {
    /// An empty connector at its reset state.
    ///
    /// # Panics
    /// If `id` exceeds [`MAX_CONNECTOR_ID`] (a configuration bug).
    pub fn new(kind: ConnectorKind, id: u32) -> Connector {
        assert!(id <= MAX_CONNECTOR_ID, "connector id {id} out of range");
        Connector {
            kind,
            id,
            state: kind.empty_state(),
            dr_indicator: DrIndicator::Inactive,
            cc_cursor: 0,
            device: None,
            unplug_requested: false,
            unplug_deadline_ms: None,
            unplug_timed_out: false,
            release_pending: false,
        }
    }

    /// Kind.
    pub fn kind(&self) -> ConnectorKind {
        self.kind
    }
    /// Id within its kind (core id, memory slot, PCI devfn).
    pub fn id(&self) -> u32 {
        self.id
    }
    /// PAPR index.
    pub fn index(&self) -> u32 {
        self.kind.index(self.id)
    }
    /// Unified state.
    pub fn state(&self) -> DrcState {
        self.state
    }
    /// DR indicator (always INACTIVE on logical connectors).
    pub fn dr_indicator(&self) -> DrIndicator {
        self.dr_indicator
    }
    /// Configure-connector cursor: responses already returned by the current walk.
    pub fn cc_cursor(&self) -> u8 {
        self.cc_cursor
    }
    /// The attached device (also while release-pending).
    pub fn device(&self) -> Option<&AttachedDevice> {
        self.device.as_ref()
    }
    /// Id of the attached device.
    pub fn device_id(&self) -> Option<&str> {
        self.device.as_ref().map(|d| d.id.as_str())
    }
    /// Whether an unplug request waits for the guest.
    pub fn unplug_requested(&self) -> bool {
        self.unplug_requested
    }
    /// Guest-running time at which a pending unplug times out.
    pub fn unplug_deadline_ms(&self) -> Option<u64> {
        self.unplug_deadline_ms
    }
    /// Whether the last unplug request timed out (a late guest completion is refused).
    pub fn unplug_timed_out(&self) -> bool {
        self.unplug_timed_out
    }
    /// Whether the guest completed an unplug whose release has not run yet.
    pub fn release_pending(&self) -> bool {
        self.release_pending
    }
    /// Whether the guest side sees a device (attached and not release-pending).
    pub fn has_device(&self) -> bool {
        self.device.is_some() && !self.release_pending
    }
    /// Milliseconds left before a pending unplug times out.
    pub fn remaining_ms(&self, now_ms: u64) -> Option<u64> {
        self.unplug_deadline_ms.map(|d| d.saturating_sub(now_ms))
    }

    /// Isolation, derived from the unified state.
    pub fn isolation(&self) -> Isolation {
        isolation_of(self.state)
    }

    /// Allocation, derived: logical connectors from the state (USABLE from AVAILABLE up),
    /// physical ones from presence (they have no allocation indicator of their own).
    pub fn allocation(&self) -> Allocation {
        allocation_of(self.kind, self.state, self.has_device())
    }

    /// dr-entity-sense as the guest reads it.
    pub fn entity_sense(&self) -> EntitySense {
        if self.kind.is_physical() {
            if self.has_device() {
                EntitySense::Present
            } else {
                EntitySense::Empty
            }
        } else if self.state == DrcState::LogicalUnusable {
            EntitySense::Unusable
        } else {
            EntitySense::Present
        }
    }

    /// The DR indicator a reset gives this connector (Precise rule 5).
    fn reset_indicator(kind: ConnectorKind, attached: bool) -> DrIndicator {
        if kind.is_physical() && attached {
            DrIndicator::Active
        } else {
            DrIndicator::Inactive
        }
    }

    /// Whether the connector is exactly what a reset would make of it, given its device.
    /// A connector with a device that is not at its reset state is *transitional*.
    pub fn at_reset_state(&self) -> bool {
        let attached = self.device.is_some();
        let state = if attached {
            self.kind.ready_state()
        } else {
            self.kind.empty_state()
        };
        self.state == state
            && !self.unplug_requested
            && !self.release_pending
            && !self.unplug_timed_out
            && self.cc_cursor == 0
            && self.dr_indicator == Self::reset_indicator(self.kind, attached)
    }

    /// Why a new device cannot be plugged right now, if the reason is transient.
    pub fn busy_reason(&self) -> Option<BusyReason> {
        if self.release_pending {
            Some(BusyReason::ReleasePending)
        } else if self.unplug_requested {
            Some(BusyReason::UnplugPending)
        } else if self.dr_indicator.is_blinking() {
            Some(BusyReason::IndicatorBlinking)
        } else if self.device.is_some()
            && (self.cc_cursor != 0
                || (self.state != self.kind.empty_state() && self.state != self.kind.ready_state()))
        {
            Some(BusyReason::Configuring)
        } else {
            None
        }
    }

    /// Attach a device (management side). The state is left alone: a running guest learns
    /// about it through a hotplug event; before start the reset makes it coldplugged.
    ///
    /// # Panics
    /// If a device is already attached (the manager checks first).
    pub fn attach(&mut self, device: AttachedDevice) {
        assert!(self.device.is_none(), "connector already has a device");
        self.device = Some(device);
        self.unplug_timed_out = false;
    }

    /// Ask the guest to release the device (`device_del`). A repeated request keeps the
    /// deadline. A connector still in its empty state is released at once (QEMU
    /// `spapr_drc_unplug_request`).
    ///
    /// # Panics
    /// If no device is visible to the guest (the manager checks first).
    pub fn request_unplug(&mut self, now_ms: u64, timeout_ms: u64) -> UnplugRequest {
        assert!(self.has_device(), "unplug request without a device");
        if self.unplug_requested {
            return UnplugRequest::AlreadyPending;
        }
        self.unplug_timed_out = false;
        if self.state == self.kind.empty_state() {
            self.cc_cursor = 0;
            let dev = self.device.take().expect("checked above");
            return UnplugRequest::Released(dev);
        }
        self.unplug_requested = true;
        self.unplug_deadline_ms = Some(now_ms.saturating_add(timeout_ms));
        UnplugRequest::AwaitingGuest
    }

    /// Time out a pending unplug whose deadline has passed: the request is dropped, a late
    /// guest completion will get an RTAS hardware error. Returns whether it timed out.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        match self.unplug_deadline_ms {
            Some(d) if self.unplug_requested && d <= now_ms => {
                self.unplug_requested = false;
                self.unplug_deadline_ms = None;
                self.unplug_timed_out = true;
                true
            }
            _ => false,
        }
    }

    /// Run a release-pending connector's release: detach and return the device.
    pub fn complete_release(&mut self) -> Option<AttachedDevice> {
        if !self.release_pending {
            return None;
        }
        self.release_pending = false;
        self.device.take()
    }

    /// Reset (Precise rule 5): a pending unplug (or release) releases the device; a device
    /// present is CONFIGURED (physical: indicator ACTIVE), an empty connector UNUSABLE
    /// (physical: POWERON, indicator INACTIVE); the configure-connector cursor is cleared.
    /// Returns the released device, if any.
    pub fn reset(&mut self) -> Option<AttachedDevice> {
        let released = if self.unplug_requested || self.release_pending {
            self.device.take()
        } else {
            None
        };
        self.unplug_requested = false;
        self.unplug_deadline_ms = None;
        self.unplug_timed_out = false;
        self.release_pending = false;
        self.cc_cursor = 0;
        let attached = self.device.is_some();
        self.state = if attached {
            self.kind.ready_state()
        } else {
            self.kind.empty_state()
        };
        self.dr_indicator = Self::reset_indicator(self.kind, attached);
        released
    }

    /// The one guest transition function (RTAS `set-indicator`, `get-sensor-state`,
    /// `ibm,configure-connector`), following QEMU's `spapr_drc.c`.
    pub fn apply(&mut self, op: GuestOp) -> Result<Outcome, RtasError> {
        match op {
            GuestOp::SetIndicator {
                token: token::ISOLATION_STATE,
                value,
            } => match Isolation::from_wire(value) {
                Some(Isolation::Isolated) if self.kind.is_physical() => self.isolate_physical(),
                Some(Isolation::Isolated) => self.isolate_logical(),
                Some(Isolation::Unisolated) if self.kind.is_physical() => self.unisolate_physical(),
                Some(Isolation::Unisolated) => self.unisolate_logical(),
                None => Err(RtasError::ParamError),
            },
            GuestOp::SetIndicator {
                token: token::ALLOCATION_STATE,
                value,
            } => {
                if self.kind.is_physical() {
                    return Err(RtasError::NoSuchIndicator);
                }
                match Allocation::from_wire(value) {
                    Some(Allocation::Usable) => self.set_usable(),
                    Some(Allocation::Unusable) => self.set_unusable(),
                    None => Err(RtasError::ParamError),
                }
            }
            GuestOp::SetIndicator {
                token: token::DR_INDICATOR,
                value,
            } => {
                if !self.kind.is_physical() {
                    return Err(RtasError::NoSuchIndicator);
                }
                // QEMU stores any value; we refuse values LoPAPR does not define so the
                // migrated indicator is always one of the four.
                self.dr_indicator = DrIndicator::from_wire(value).ok_or(RtasError::ParamError)?;
                Ok(Outcome::Done)
            }
            GuestOp::SetIndicator { .. } => Err(RtasError::NoSuchIndicator),
            GuestOp::GetSensorState { token } => {
                if token == token::ENTITY_SENSE {
                    Ok(Outcome::Sensor(self.entity_sense()))
                } else {
                    Err(RtasError::ParamError)
                }
            }
            GuestOp::ConfigureConnector => self.configure_step(),
        }
    }

    /// The guest finished the unplug: the connector becomes release-pending.
    fn unplug_completed(&mut self) -> Outcome {
        self.unplug_requested = false;
        self.unplug_deadline_ms = None;
        self.release_pending = true;
        self.cc_cursor = 0;
        Outcome::UnplugCompleted
    }

    fn isolate_logical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalAvailable | DrcState::LogicalUnusable => Ok(Outcome::Done),
            DrcState::LogicalConfigured => {
                if self.unplug_timed_out {
                    return Err(RtasError::HwError);
                }
                // drmgr tries any removable LMB: refuse those not being unplugged.
                if self.kind == ConnectorKind::MemBlock && !self.unplug_requested {
                    return Err(RtasError::HwError);
                }
                self.state = DrcState::LogicalAvailable;
                self.cc_cursor = 0;
                Ok(Outcome::Done)
            }
            _ => Err(RtasError::ParamError), // LogicalUnisolate
        }
    }

    fn unisolate_logical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalUnisolate | DrcState::LogicalConfigured => {
                if self.unplug_requested && self.has_device() {
                    // The guest refuses the removal.
                    self.unplug_requested = false;
                    self.unplug_deadline_ms = None;
                    return Ok(Outcome::UnplugRejected);
                }
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            DrcState::LogicalAvailable => {
                self.state = DrcState::LogicalUnisolate;
                self.cc_cursor = 0;
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            _ => Err(RtasError::NoSuchIndicator), // LogicalUnusable
        }
    }

    fn set_usable(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalUnusable => {
                if !self.has_device() || self.unplug_requested {
                    return Err(RtasError::NoSuchIndicator);
                }
                self.state = DrcState::LogicalAvailable;
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            _ => Ok(Outcome::Done),
        }
    }

    fn set_unusable(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::LogicalUnusable => Ok(Outcome::Done),
            DrcState::LogicalAvailable => {
                if self.unplug_timed_out {
                    return Err(RtasError::HwError);
                }
                self.state = DrcState::LogicalUnusable;
                if self.unplug_requested {
                    Ok(self.unplug_completed())
                } else {
                    Ok(Outcome::Done)
                }
            }
            _ => Err(RtasError::NoSuchIndicator), // Unisolate, Configured
        }
    }

    fn isolate_physical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::PhysicalPowerOn => Ok(Outcome::Done),
            DrcState::PhysicalConfigured => {
                if self.unplug_timed_out {
                    return Err(RtasError::HwError);
                }
                self.state = DrcState::PhysicalPowerOn;
                self.cc_cursor = 0;
                if self.unplug_requested {
                    Ok(self.unplug_completed())
                } else {
                    Ok(Outcome::Done)
                }
            }
            _ => Err(RtasError::ParamError), // PhysicalUnisolate
        }
    }

    fn unisolate_physical(&mut self) -> Result<Outcome, RtasError> {
        match self.state {
            DrcState::PhysicalUnisolate | DrcState::PhysicalConfigured => {
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
            _ => {
                // PhysicalPowerOn: cannot unisolate a non-existent resource.
                if !self.has_device() {
                    return Err(RtasError::NoSuchIndicator);
                }
                self.state = DrcState::PhysicalUnisolate;
                self.cc_cursor = 0;
                self.unplug_timed_out = false;
                Ok(Outcome::Done)
            }
        }
    }

    fn configure_step(&mut self) -> Result<Outcome, RtasError> {
        let unisolated = matches!(
            self.state,
            DrcState::LogicalUnisolate | DrcState::PhysicalUnisolate
        );
        if !unisolated && self.state != self.kind.ready_state() {
            return Err(RtasError::NotConfigurable);
        }
        self.unplug_timed_out = false;
        let script = self.kind.configure_script();
        let resp = script[usize::from(self.cc_cursor)];
        if resp == CcResponse::Success {
            self.cc_cursor = 0;
            if unisolated {
                self.state = self.kind.ready_state();
                return Ok(Outcome::Configured);
            }
        } else {
            self.cc_cursor += 1;
        }
        Ok(Outcome::ConfigureStep(resp))
    }

    /// Check every invariant of the model; `Err` names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let k = self.kind;
        let fail = |why: &str| Err(format!("connector {:#010x}: {why}", self.index()));
        if !self.state.valid_for(k) {
            return fail(&format!(
                "state {} invalid for {}",
                self.state.name(),
                k.name()
            ));
        }
        if self.state != k.empty_state() && !self.has_device() {
            return fail("non-empty state without a device");
        }
        if self.unplug_requested != self.unplug_deadline_ms.is_some() {
            return fail("unplug request and deadline disagree");
        }
        if self.unplug_requested && (!self.has_device() || self.state == k.empty_state()) {
            return fail("unplug pending without a device in use");
        }
        if self.unplug_timed_out && (!self.has_device() || self.unplug_requested) {
            return fail("timed-out flag without a device or with a pending request");
        }
        if self.release_pending && (self.device.is_none() || self.state != k.empty_state()) {
            return fail("release pending outside the empty state");
        }
        if usize::from(self.cc_cursor) >= k.configure_script().len() {
            return fail("configure-connector cursor past the fragment");
        }
        if self.cc_cursor != 0
            && !matches!(
                self.state,
                DrcState::LogicalUnisolate
                    | DrcState::LogicalConfigured
                    | DrcState::PhysicalUnisolate
                    | DrcState::PhysicalConfigured
            )
        {
            return fail("configure-connector cursor outside unisolate/configured");
        }
        if !k.is_physical() && self.dr_indicator != DrIndicator::Inactive {
            return fail("logical connector with a DR indicator");
        }
        if let Some(d) = &self.device
            && !valid_device_id(&d.id)
        {
            return fail("invalid device id");
        }
        Ok(())
    }

    /// The migrated form of this connector at guest-running time `now_ms`.
    pub fn to_state(&self, now_ms: u64) -> ConnectorState {
        ConnectorState {
            index: self.index(),
            state: self.state.wire(),
            device: self.device_id().unwrap_or_default().to_owned(),
            unplug_requested: self.unplug_requested,
            release_pending: self.release_pending,
            unplug_timed_out: self.unplug_timed_out,
            isolation: self.isolation() as u8,
            allocation: self.allocation() as u8,
            dr_indicator: self.dr_indicator as u8,
            cc_cursor: self.cc_cursor,
            remaining_ms: self.remaining_ms(now_ms).unwrap_or(0),
            remaining_known: self.unplug_requested,
        }
    }

    /// Overwrite this connector with a migrated state (the destination already has the same
    /// device attached, added before start). Fields an older section version does not carry
    /// take their reset values; without the `unplug-timer` subsection a pending unplug gets
    /// the full `timeout_ms` again, counted from `now_ms`. Atomic: on error nothing changed.
    pub fn restore(
        &mut self,
        s: &ConnectorState,
        now_ms: u64,
        timeout_ms: u64,
    ) -> Result<(), RestoreError> {
        let err = |why: String| RestoreError {
            index: self.index(),
            why,
        };
        if s.index != self.index() {
            return Err(err(format!("stream carries index {:#010x}", s.index)));
        }
        let state = DrcState::from_wire(s.state)
            .filter(|st| st.valid_for(self.kind))
            .ok_or_else(|| {
                err(format!(
                    "state {} is not valid for a {}",
                    s.state,
                    self.kind.name()
                ))
            })?;
        match (self.device_id(), s.device.as_str()) {
            (_, "") => {
                return Err(err("section without an attached device".to_owned()));
            }
            (None, src) => {
                return Err(err(format!(
                    "device '{src}' is attached on the source but not here; add it with device_add before the incoming migration starts"
                )));
            }
            (Some(dst), src) if dst != src => {
                return Err(err(format!(
                    "source has device '{src}' attached, this side has '{dst}'"
                )));
            }
            _ => {}
        }
        let mut next = self.clone();
        next.state = state;
        next.unplug_requested = s.unplug_requested;
        next.release_pending = s.release_pending;
        next.unplug_timed_out = s.unplug_timed_out;
        next.unplug_deadline_ms = s.unplug_requested.then(|| {
            let left = if s.remaining_known {
                s.remaining_ms.min(timeout_ms)
            } else {
                timeout_ms
            };
            now_ms.saturating_add(left)
        });
        next.dr_indicator = if s.dr_indicator == ABSENT {
            // A v1 stream does not carry the indicator: a configured function shows ACTIVE,
            // one still waiting (e.g. for function 0 of its slot) INACTIVE, as a guest that
            // never touched it would have left it.
            Self::reset_indicator(self.kind, state == DrcState::PhysicalConfigured)
        } else {
            DrIndicator::from_wire(u32::from(s.dr_indicator))
                .ok_or_else(|| err(format!("DR indicator {} is invalid", s.dr_indicator)))?
        };
        next.cc_cursor = if s.cc_cursor == ABSENT {
            0
        } else {
            s.cc_cursor
        };
        if s.isolation != ABSENT && s.isolation != next.isolation() as u8 {
            return Err(err(format!(
                "isolation {} disagrees with state {}",
                s.isolation,
                state.name()
            )));
        }
        if s.allocation != ABSENT && s.allocation != next.allocation() as u8 {
            return Err(err(format!(
                "allocation {} disagrees with state {}",
                s.allocation,
                state.name()
            )));
        }
        next.check_invariants().map_err(err)?;
        *self = next;
        Ok(())
    }
}

/// Isolation as a projection of the unified state.
pub fn isolation_of(state: DrcState) -> Isolation {
    match state {
        DrcState::LogicalUnisolate
        | DrcState::LogicalConfigured
        | DrcState::PhysicalUnisolate
        | DrcState::PhysicalConfigured => Isolation::Unisolated,
        _ => Isolation::Isolated,
    }
}

/// Allocation as a projection of kind, state and presence.
pub fn allocation_of(kind: ConnectorKind, state: DrcState, present: bool) -> Allocation {
    let usable = if kind.is_physical() {
        present
    } else {
        !matches!(state, DrcState::LogicalUnusable | DrcState::Invalid)
    };
    if usable {
        Allocation::Usable
    } else {
        Allocation::Unusable
    }
}

/// QEMU's `id_wellformed` plus our length bound: a letter, then letters, digits, `-`, `.`,
/// `_`; at most [`DEVICE_ID_MAX`] bytes.
pub fn valid_device_id(id: &str) -> bool {
    let mut chars = id.chars();
    id.len() <= DEVICE_ID_MAX
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConnectorKind::{CpuCore, MemBlock, PciFn};
    use DrcState::*;

    fn dev(id: &str) -> AttachedDevice {
        AttachedDevice {
            id: id.to_owned(),
            multifunction: false,
        }
    }

    /// A connector of `kind` in `state`, with or without a device and a pending unplug.
    fn conn(kind: ConnectorKind, state: DrcState, with_dev: bool, unplug: bool) -> Connector {
        let mut c = Connector::new(kind, 1);
        if with_dev {
            c.device = Some(dev("d1"));
        }
        c.state = state;
        if unplug {
            c.unplug_requested = true;
            c.unplug_deadline_ms = Some(1000);
        }
        if kind.is_physical() && with_dev {
            c.dr_indicator = DrIndicator::Active;
        }
        c.check_invariants().unwrap();
        c
    }

    const ISO: GuestOp = GuestOp::ISOLATE;
    const UNISO: GuestOp = GuestOp::UNISOLATE;
    const USABLE: GuestOp = GuestOp::SET_USABLE;
    const UNUSABLE: GuestOp = GuestOp::SET_UNUSABLE;
    const SENSE: GuestOp = GuestOp::ENTITY_SENSE;
    const CC: GuestOp = GuestOp::ConfigureConnector;
    const DR: GuestOp = GuestOp::SetIndicator {
        token: token::DR_INDICATOR,
        value: 3,
    };

    use Outcome::{ConfigureStep, Done, Sensor, UnplugCompleted, UnplugRejected};
    use RtasError::{HwError, NoSuchIndicator as Nsi, NotConfigurable, ParamError};
    const STEP: Outcome = ConfigureStep(CcResponse::NextChild);

    /// Expected result of `op` and the state after it (unchanged on error).
    type Row = (GuestOp, Result<Outcome, RtasError>, DrcState);

    fn check(kind: ConnectorKind, from: DrcState, with_dev: bool, unplug: bool, rows: &[Row]) {
        for (op, want, after) in rows {
            let mut c = conn(kind, from, with_dev, unplug);
            let got = c.apply(*op);
            assert_eq!(
                (&got, c.state),
                (want, *after),
                "{kind:?} {from:?} dev={with_dev} unplug={unplug} {op:?}"
            );
            c.check_invariants().unwrap();
            if got.is_err() {
                assert_eq!(
                    c,
                    conn(kind, from, with_dev, unplug),
                    "an error changes nothing"
                );
            }
        }
    }

    #[test]
    fn logical_transitions_with_device() {
        for kind in [CpuCore, MemBlock] {
            let lmb_isolate = if kind == MemBlock {
                Err(HwError)
            } else {
                Ok(Done)
            };
            let after_iso = if kind == MemBlock {
                LogicalConfigured
            } else {
                LogicalAvailable
            };
            #[rustfmt::skip]
            let table: [(DrcState, [Row; 7]); 4] = [
                (LogicalUnusable, [
                    (ISO, Ok(Done), LogicalUnusable),
                    (UNISO, Err(Nsi), LogicalUnusable),
                    (USABLE, Ok(Done), LogicalAvailable),
                    (UNUSABLE, Ok(Done), LogicalUnusable),
                    (DR, Err(Nsi), LogicalUnusable),
                    (SENSE, Ok(Sensor(EntitySense::Unusable)), LogicalUnusable),
                    (CC, Err(NotConfigurable), LogicalUnusable),
                ]),
                (LogicalAvailable, [
                    (ISO, Ok(Done), LogicalAvailable),
                    (UNISO, Ok(Done), LogicalUnisolate),
                    (USABLE, Ok(Done), LogicalAvailable),
                    (UNUSABLE, Ok(Done), LogicalUnusable),
                    (DR, Err(Nsi), LogicalAvailable),
                    (SENSE, Ok(Sensor(EntitySense::Present)), LogicalAvailable),
                    (CC, Err(NotConfigurable), LogicalAvailable),
                ]),
                (LogicalUnisolate, [
                    (ISO, Err(ParamError), LogicalUnisolate),
                    (UNISO, Ok(Done), LogicalUnisolate),
                    (USABLE, Ok(Done), LogicalUnisolate),
                    (UNUSABLE, Err(Nsi), LogicalUnisolate),
                    (DR, Err(Nsi), LogicalUnisolate),
                    (SENSE, Ok(Sensor(EntitySense::Present)), LogicalUnisolate),
                    (CC, Ok(STEP), LogicalUnisolate),
                ]),
                (LogicalConfigured, [
                    (ISO, lmb_isolate, after_iso),
                    (UNISO, Ok(Done), LogicalConfigured),
                    (USABLE, Ok(Done), LogicalConfigured),
                    (UNUSABLE, Err(Nsi), LogicalConfigured),
                    (DR, Err(Nsi), LogicalConfigured),
                    (SENSE, Ok(Sensor(EntitySense::Present)), LogicalConfigured),
                    (CC, Ok(STEP), LogicalConfigured),
                ]),
            ];
            for (from, rows) in table {
                check(kind, from, true, false, &rows);
            }
        }
    }

    #[test]
    fn logical_transitions_with_unplug_requested() {
        for kind in [CpuCore, MemBlock] {
            #[rustfmt::skip]
            let table: [(DrcState, [Row; 5]); 3] = [
                (LogicalAvailable, [
                    (ISO, Ok(Done), LogicalAvailable),
                    // unisolate from AVAILABLE is not a refusal (QEMU checks only
                    // UNISOLATE/CONFIGURED)
                    (UNISO, Ok(Done), LogicalUnisolate),
                    (USABLE, Ok(Done), LogicalAvailable),
                    (UNUSABLE, Ok(UnplugCompleted), LogicalUnusable),
                    (CC, Err(NotConfigurable), LogicalAvailable),
                ]),
                (LogicalUnisolate, [
                    (ISO, Err(ParamError), LogicalUnisolate),
                    (UNISO, Ok(UnplugRejected), LogicalUnisolate),
                    (USABLE, Ok(Done), LogicalUnisolate),
                    (UNUSABLE, Err(Nsi), LogicalUnisolate),
                    (CC, Ok(STEP), LogicalUnisolate),
                ]),
                (LogicalConfigured, [
                    (ISO, Ok(Done), LogicalAvailable),
                    (UNISO, Ok(UnplugRejected), LogicalConfigured),
                    (USABLE, Ok(Done), LogicalConfigured),
                    (UNUSABLE, Err(Nsi), LogicalConfigured),
                    (CC, Ok(STEP), LogicalConfigured),
                ]),
            ];
            for (from, rows) in table {
                check(kind, from, true, true, &rows);
            }
        }
    }

    #[test]
    fn logical_and_physical_without_device() {
        #[rustfmt::skip]
        check(CpuCore, LogicalUnusable, false, false, &[
            (ISO, Ok(Done), LogicalUnusable),
            (UNISO, Err(Nsi), LogicalUnusable),
            (USABLE, Err(Nsi), LogicalUnusable),
            (UNUSABLE, Ok(Done), LogicalUnusable),
            (SENSE, Ok(Sensor(EntitySense::Unusable)), LogicalUnusable),
            (CC, Err(NotConfigurable), LogicalUnusable),
        ]);
        #[rustfmt::skip]
        check(PciFn, PhysicalPowerOn, false, false, &[
            (ISO, Ok(Done), PhysicalPowerOn),
            (UNISO, Err(Nsi), PhysicalPowerOn),
            (USABLE, Err(Nsi), PhysicalPowerOn),
            (DR, Ok(Done), PhysicalPowerOn),
            (SENSE, Ok(Sensor(EntitySense::Empty)), PhysicalPowerOn),
            (CC, Err(NotConfigurable), PhysicalPowerOn),
        ]);
    }

    #[test]
    fn physical_transitions() {
        #[rustfmt::skip]
        let table: [(DrcState, bool, [Row; 7]); 5] = [
            (PhysicalPowerOn, false, [
                (ISO, Ok(Done), PhysicalPowerOn),
                (UNISO, Ok(Done), PhysicalUnisolate),
                (USABLE, Err(Nsi), PhysicalPowerOn),
                (UNUSABLE, Err(Nsi), PhysicalPowerOn),
                (DR, Ok(Done), PhysicalPowerOn),
                (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalPowerOn),
                (CC, Err(NotConfigurable), PhysicalPowerOn),
            ]),
            (PhysicalUnisolate, false, [
                (ISO, Err(ParamError), PhysicalUnisolate),
                (UNISO, Ok(Done), PhysicalUnisolate),
                (USABLE, Err(Nsi), PhysicalUnisolate),
                (UNUSABLE, Err(Nsi), PhysicalUnisolate),
                (DR, Ok(Done), PhysicalUnisolate),
                (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalUnisolate),
                (CC, Ok(STEP), PhysicalUnisolate),
            ]),
            (PhysicalConfigured, false, [
                (ISO, Ok(Done), PhysicalPowerOn),
                (UNISO, Ok(Done), PhysicalConfigured),
                (USABLE, Err(Nsi), PhysicalConfigured),
                (UNUSABLE, Err(Nsi), PhysicalConfigured),
                (DR, Ok(Done), PhysicalConfigured),
                (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalConfigured),
                (CC, Ok(STEP), PhysicalConfigured),
            ]),
            (PhysicalUnisolate, true, [
                (ISO, Err(ParamError), PhysicalUnisolate),
                // physical connectors have no refusal path
                (UNISO, Ok(Done), PhysicalUnisolate),
                (USABLE, Err(Nsi), PhysicalUnisolate),
                (UNUSABLE, Err(Nsi), PhysicalUnisolate),
                (DR, Ok(Done), PhysicalUnisolate),
                (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalUnisolate),
                (CC, Ok(STEP), PhysicalUnisolate),
            ]),
            (PhysicalConfigured, true, [
                (ISO, Ok(UnplugCompleted), PhysicalPowerOn),
                (UNISO, Ok(Done), PhysicalConfigured),
                (USABLE, Err(Nsi), PhysicalConfigured),
                (UNUSABLE, Err(Nsi), PhysicalConfigured),
                (DR, Ok(Done), PhysicalConfigured),
                (SENSE, Ok(Sensor(EntitySense::Present)), PhysicalConfigured),
                (CC, Ok(STEP), PhysicalConfigured),
            ]),
        ];
        for (from, unplug, rows) in table {
            check(PciFn, from, true, unplug, &rows);
        }
    }

    #[test]
    fn bad_tokens_and_values() {
        let mut l = conn(CpuCore, LogicalConfigured, true, false);
        let mut p = conn(PciFn, PhysicalConfigured, true, false);
        let set = |token, value| GuestOp::SetIndicator { token, value };
        for c in [&mut l, &mut p] {
            assert_eq!(c.apply(set(token::ISOLATION_STATE, 2)), Err(ParamError));
            assert_eq!(c.apply(set(9999, 0)), Err(Nsi));
            assert_eq!(
                c.apply(GuestOp::GetSensorState { token: 9001 }),
                Err(ParamError)
            );
            assert_eq!(
                c.apply(GuestOp::GetSensorState { token: 9002 }),
                Err(ParamError)
            );
        }
        for v in [2, 3, 7] {
            assert_eq!(l.apply(set(token::ALLOCATION_STATE, v)), Err(ParamError));
            assert_eq!(p.apply(set(token::ALLOCATION_STATE, v)), Err(Nsi));
        }
        assert_eq!(p.apply(set(token::DR_INDICATOR, 4)), Err(ParamError));
        assert_eq!(p.dr_indicator(), DrIndicator::Active);
        for (v, ind) in [
            (0, DrIndicator::Inactive),
            (2, DrIndicator::Identify),
            (3, DrIndicator::Action),
            (1, DrIndicator::Active),
        ] {
            assert_eq!(p.apply(set(token::DR_INDICATOR, v)), Ok(Done));
            assert_eq!(p.dr_indicator(), ind);
        }
        assert_eq!(l, conn(CpuCore, LogicalConfigured, true, false));
        assert_eq!(RtasError::HwError.code(), -1);
        assert_eq!(Nsi.code(), -3);
        assert_eq!(ParamError.code(), -3);
        assert_eq!(NotConfigurable.code(), -9003);
    }

    #[test]
    fn configure_walks_per_kind() {
        for (kind, from, want) in [
            (CpuCore, LogicalUnisolate, vec![2, 3, 3, 3, 2, 3, 4, 0]),
            (MemBlock, LogicalUnisolate, vec![2, 3, 3, 3, 0]),
            (PciFn, PhysicalUnisolate, vec![2, 3, 3, 3, 3, 0]),
        ] {
            let mut c = conn(kind, from, true, false);
            let mut got = Vec::new();
            for step in 0.. {
                assert_eq!(usize::from(c.cc_cursor()), step);
                let out = c.apply(CC).unwrap();
                got.push(out.status());
                c.check_invariants().unwrap();
                if out == Outcome::Configured {
                    break;
                }
                assert_eq!(c.state(), from);
            }
            assert_eq!(got, want, "{kind:?}");
            assert_eq!(c.state(), kind.ready_state());
            assert_eq!(c.cc_cursor(), 0);
            // A repeated walk on a configured connector ends in SUCCESS without a transition.
            let mut last = Outcome::Done;
            for _ in 0..want.len() {
                last = c.apply(CC).unwrap();
            }
            assert_eq!(last, ConfigureStep(CcResponse::Success));
            assert_eq!(c.cc_cursor(), 0);
        }
    }

    #[test]
    fn isolate_mid_walk_clears_the_cursor() {
        let mut c = conn(CpuCore, LogicalConfigured, true, false);
        c.apply(CC).unwrap();
        c.apply(CC).unwrap();
        assert_eq!(c.cc_cursor(), 2);
        assert_eq!(c.busy_reason(), Some(BusyReason::Configuring));
        c.apply(ISO).unwrap();
        assert_eq!((c.state(), c.cc_cursor()), (LogicalAvailable, 0));
        c.apply(UNISO).unwrap();
        assert_eq!(c.apply(CC), Ok(STEP));
    }

    #[test]
    fn full_logical_add_and_remove() {
        let mut c = Connector::new(CpuCore, 3);
        assert_eq!(c.index(), 0x1000_0003);
        c.attach(dev("cpu3"));
        assert!(!c.at_reset_state(), "hot-added, not yet configured");
        for op in [USABLE, UNISO] {
            assert_eq!(c.apply(op), Ok(Done));
        }
        while c.apply(CC).unwrap() != Outcome::Configured {}
        assert!(c.at_reset_state());
        assert_eq!(c.request_unplug(100, 1000), UnplugRequest::AwaitingGuest);
        assert_eq!(c.unplug_deadline_ms(), Some(1100));
        assert_eq!(c.busy_reason(), Some(BusyReason::UnplugPending));
        // a repeated request keeps the deadline
        assert_eq!(c.request_unplug(900, 1000), UnplugRequest::AlreadyPending);
        assert_eq!(c.unplug_deadline_ms(), Some(1100));
        assert_eq!(c.apply(USABLE), Ok(Done));
        assert_eq!(c.apply(ISO), Ok(Done));
        assert_eq!(c.apply(UNUSABLE), Ok(UnplugCompleted));
        assert!(c.release_pending() && !c.unplug_requested());
        assert_eq!(c.unplug_deadline_ms(), None);
        assert_eq!(c.busy_reason(), Some(BusyReason::ReleasePending));
        // the guest no longer sees it
        assert_eq!(c.apply(USABLE), Err(Nsi));
        c.check_invariants().unwrap();
        assert_eq!(c.complete_release(), Some(dev("cpu3")));
        assert_eq!(c.complete_release(), None);
        assert_eq!(c, Connector::new(CpuCore, 3));
    }

    #[test]
    fn physical_remove_and_immediate_release() {
        let mut c = conn(PciFn, PhysicalConfigured, true, false);
        assert_eq!(c.request_unplug(0, 50), UnplugRequest::AwaitingGuest);
        assert_eq!(c.apply(ISO), Ok(UnplugCompleted));
        assert_eq!(c.entity_sense(), EntitySense::Empty);
        assert_eq!(c.complete_release(), Some(dev("d1")));
        // attached but never taken by the guest: released at once
        let mut c = conn(PciFn, PhysicalPowerOn, true, false);
        assert_eq!(c.request_unplug(0, 50), UnplugRequest::Released(dev("d1")));
        assert!(c.device().is_none() && !c.unplug_requested());
        let mut c = conn(MemBlock, LogicalUnusable, true, false);
        assert_eq!(c.request_unplug(0, 50), UnplugRequest::Released(dev("d1")));
    }

    #[test]
    fn guest_refusal_clears_the_request() {
        let mut c = conn(CpuCore, LogicalConfigured, true, true);
        assert_eq!(c.apply(UNISO), Ok(UnplugRejected));
        assert!(!c.unplug_requested() && c.unplug_deadline_ms().is_none());
        assert!(!c.unplug_timed_out());
        assert!(c.at_reset_state());
        // a second unisolate is a plain no-op
        assert_eq!(c.apply(UNISO), Ok(Done));
    }

    #[test]
    fn timeout_then_late_completion_is_a_hardware_error() {
        // CPU: guest silent, then isolates late.
        let mut c = conn(CpuCore, LogicalConfigured, true, false);
        c.request_unplug(0, 1000);
        assert!(!c.expire(999));
        assert!(c.expire(1000));
        assert!(!c.expire(5000), "fires once");
        assert!(c.unplug_timed_out() && !c.unplug_requested());
        assert!(!c.at_reset_state());
        let before = c.clone();
        assert_eq!(c.apply(ISO), Err(HwError));
        assert_eq!(c, before);
        // CPU: guest isolated in time but releases late.
        let mut c = conn(CpuCore, LogicalConfigured, true, false);
        c.request_unplug(0, 1000);
        c.apply(ISO).unwrap();
        assert!(c.expire(1000));
        assert_eq!(c.apply(UNUSABLE), Err(HwError));
        assert_eq!(c.state(), LogicalAvailable);
        // rolling back (unisolate) clears the flag
        c.apply(UNISO).unwrap();
        assert!(!c.unplug_timed_out());
        while c.apply(CC).unwrap() != Outcome::Configured {}
        assert!(c.at_reset_state());
        // PCI: late isolate.
        let mut p = conn(PciFn, PhysicalConfigured, true, false);
        p.request_unplug(10, 100);
        assert!(p.expire(110));
        assert_eq!(p.apply(ISO), Err(HwError));
        assert_eq!(p.state(), PhysicalConfigured);
        // a new request (retry) clears the flag and restarts the timer
        assert_eq!(p.request_unplug(200, 100), UnplugRequest::AwaitingGuest);
        assert!(!p.unplug_timed_out());
        assert_eq!(p.unplug_deadline_ms(), Some(300));
        assert_eq!(p.apply(ISO), Ok(UnplugCompleted));
    }

    #[test]
    fn reset_table() {
        // (kind, state, device, unplug) -> (state, indicator, device kept)
        let cases = [
            (
                CpuCore,
                LogicalUnusable,
                true,
                false,
                LogicalConfigured,
                DrIndicator::Inactive,
                true,
            ),
            (
                CpuCore,
                LogicalUnisolate,
                true,
                false,
                LogicalConfigured,
                DrIndicator::Inactive,
                true,
            ),
            (
                CpuCore,
                LogicalUnusable,
                false,
                false,
                LogicalUnusable,
                DrIndicator::Inactive,
                false,
            ),
            (
                MemBlock,
                LogicalConfigured,
                true,
                true,
                LogicalUnusable,
                DrIndicator::Inactive,
                false,
            ),
            (
                PciFn,
                PhysicalPowerOn,
                true,
                false,
                PhysicalConfigured,
                DrIndicator::Active,
                true,
            ),
            (
                PciFn,
                PhysicalUnisolate,
                true,
                false,
                PhysicalConfigured,
                DrIndicator::Active,
                true,
            ),
            (
                PciFn,
                PhysicalPowerOn,
                false,
                false,
                PhysicalPowerOn,
                DrIndicator::Inactive,
                false,
            ),
            (
                PciFn,
                PhysicalConfigured,
                true,
                true,
                PhysicalPowerOn,
                DrIndicator::Inactive,
                false,
            ),
        ];
        for (kind, from, with_dev, unplug, state, ind, kept) in cases {
            let mut c = conn(kind, from, with_dev, unplug);
            if kind.is_physical() {
                c.dr_indicator = DrIndicator::Action;
            }
            if matches!(from, LogicalUnisolate | PhysicalUnisolate) {
                c.apply(CC).unwrap();
                assert_eq!(c.cc_cursor(), 1);
            }
            let released = c.reset();
            assert_eq!(released.is_some(), with_dev && !kept, "{kind:?} {from:?}");
            assert_eq!(c.device().is_some(), kept);
            assert_eq!(
                (c.state(), c.dr_indicator(), c.cc_cursor()),
                (state, ind, 0)
            );
            assert!(!c.unplug_requested() && c.unplug_deadline_ms().is_none());
            assert!(c.at_reset_state());
            c.check_invariants().unwrap();
        }
        // release-pending and timed-out connectors
        let mut c = conn(CpuCore, LogicalAvailable, true, true);
        c.apply(UNUSABLE).unwrap();
        assert_eq!(c.reset(), Some(dev("d1")));
        assert_eq!(c, Connector::new(CpuCore, 1));
        let mut c = conn(CpuCore, LogicalConfigured, true, true);
        c.expire(1000);
        assert_eq!(c.reset(), None);
        assert!(!c.unplug_timed_out() && c.at_reset_state());
    }

    #[test]
    fn indices_wire_values_and_names() {
        assert_eq!(CpuCore.index(3), 0x1000_0003);
        assert_eq!(PciFn.index(8), 0x4000_0008);
        assert_eq!(MemBlock.index(2), 0x8000_0002);
        for k in ConnectorKind::ALL {
            assert_eq!(ConnectorKind::from_index(k.index(77)), Some((k, 77)));
        }
        assert_eq!(ConnectorKind::from_index(0x2000_0001), None);
        assert_eq!(ConnectorKind::from_index(0), None);
        let wire: Vec<u8> = DrcState::ALL.iter().map(|s| s.wire()).collect();
        assert_eq!(wire, (0..=8).collect::<Vec<u8>>());
        assert_eq!(DrcState::from_wire(4), Some(LogicalConfigured));
        assert_eq!(DrcState::from_wire(9), None);
        assert_eq!(PhysicalPowerOn.name(), "physical-poweron");
        assert!(!PhysicalAvailable.valid_for(PciFn) && !Invalid.valid_for(CpuCore));
        assert_eq!(
            [
                DrIndicator::Inactive,
                DrIndicator::Active,
                DrIndicator::Identify,
                DrIndicator::Action
            ]
            .map(|d| d as u8),
            [0, 1, 2, 3]
        );
        assert!(valid_device_id("nic0.f-1_x"));
        for bad in ["", "0abc", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_device_id(bad), "{bad}");
        }
        assert!(valid_device_id(&"x".repeat(64)));
    }

    #[test]
    fn busy_reasons() {
        let mut p = Connector::new(PciFn, 8);
        assert_eq!(p.busy_reason(), None);
        p.apply(DR).unwrap();
        assert_eq!(p.busy_reason(), Some(BusyReason::IndicatorBlinking));
        let c = conn(CpuCore, LogicalAvailable, true, false);
        assert_eq!(c.busy_reason(), Some(BusyReason::Configuring));
        let c = conn(CpuCore, LogicalUnusable, true, false);
        assert_eq!(c.busy_reason(), None, "occupied, not busy");
    }

    #[test]
    fn state_restore_round_trip_and_refusals() {
        let mut src = conn(PciFn, PhysicalUnisolate, true, false);
        src.apply(CC).unwrap();
        src.apply(GuestOp::dr_indicator(DrIndicator::Identify))
            .unwrap();
        let mut p = conn(PciFn, PhysicalConfigured, true, false);
        p.request_unplug(100, 1000);
        for src in [src, p] {
            let s = src.to_state(400);
            let mut dst = conn(PciFn, PhysicalConfigured, true, false);
            dst.restore(&s, 400, 1000).unwrap();
            assert_eq!(dst, src);
            // a v1 stream without the timer: full timeout from now, reset values for v2 fields
            let mut v1 = s.clone();
            v1.isolation = ABSENT;
            v1.allocation = ABSENT;
            v1.dr_indicator = ABSENT;
            v1.cc_cursor = ABSENT;
            v1.remaining_known = false;
            let mut dst = conn(PciFn, PhysicalConfigured, true, false);
            dst.restore(&v1, 50, 1000).unwrap();
            assert_eq!(dst.state(), src.state());
            // without the v2 field the indicator follows the state
            let ind = if src.state() == PhysicalConfigured {
                DrIndicator::Active
            } else {
                DrIndicator::Inactive
            };
            assert_eq!(dst.dr_indicator(), ind);
            assert_eq!(dst.cc_cursor(), 0);
            assert_eq!(
                dst.unplug_deadline_ms(),
                src.unplug_requested().then_some(1050)
            );
        }
        let s = conn(PciFn, PhysicalUnisolate, true, false).to_state(0);
        let empty = Connector::new(PciFn, 1);
        let mut e = empty.clone();
        assert!(e.restore(&s, 0, 1000).unwrap_err().why.contains("not here"));
        assert_eq!(e, empty);
        let mut other = Connector::new(PciFn, 1);
        other.attach(dev("other"));
        let keep = other.clone();
        assert!(
            other
                .restore(&s, 0, 1000)
                .unwrap_err()
                .why
                .contains("'other'")
        );
        assert_eq!(other, keep);
        let mut d = conn(PciFn, PhysicalConfigured, true, false);
        let mut bad = s.clone();
        bad.isolation = 0;
        let e = d.restore(&bad, 0, 1000).unwrap_err();
        assert!(e.why.contains("isolation 0 disagrees"), "{e}");
        let mut bad = s.clone();
        bad.allocation = 0;
        assert!(
            d.restore(&bad, 0, 1000)
                .unwrap_err()
                .why
                .contains("allocation")
        );
        let mut bad = s.clone();
        bad.state = LogicalConfigured.wire();
        assert!(d.restore(&bad, 0, 1000).is_err());
        let mut bad = s;
        bad.unplug_timed_out = true;
        bad.release_pending = true;
        assert!(d.restore(&bad, 0, 1000).is_err(), "invariants checked");
        assert_eq!(d, conn(PciFn, PhysicalConfigured, true, false));
    }
}
