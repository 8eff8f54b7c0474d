//! The PAPR vocabulary shared by the runtime connectors and their migrated state: connector
//! kinds and indices, the unified DRC state and its projections, indicator and sensor values,
//! RTAS tokens, guest operations and RTAS status codes. Plain values, no behaviour beyond
//! conversions, so every other module can depend on it one way.

/// PAPR type shift of CPU-core connectors (`index = 1 << 28 | core_id`).
pub const TYPE_SHIFT_CPU: u32 = 1;
/// PAPR type shift of PCI connectors (`index = 4 << 28 | devfn`).
pub const TYPE_SHIFT_PCI: u32 = 4;
/// PAPR type shift of memory-block (LMB) connectors (`index = 8 << 28 | slot`).
pub const TYPE_SHIFT_LMB: u32 = 8;
/// Largest connector id (the low 28 bits of the index).
pub const MAX_CONNECTOR_ID: u32 = (1 << 28) - 1;

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum DrcState {
    /// Never a valid state; only exists so 0 on the wire is recognisably wrong (the codec
    /// refuses it).
    #[default]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Isolation {
    /// Isolated from the guest.
    #[default]
    Isolated = 0,
    /// Unisolated (the guest may configure and use it).
    Unisolated = 1,
}

impl Isolation {
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Allocation {
    /// Not allocated to the guest.
    #[default]
    Unusable = 0,
    /// Allocated to the guest.
    Usable = 1,
}

impl Allocation {
    /// Name used in queries.
    pub const fn name(self) -> &'static str {
        match self {
            Allocation::Unusable => "unusable",
            Allocation::Usable => "usable",
        }
    }
}

/// DR indicator values (token 9002), physical connectors only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DrIndicator {
    /// Off.
    #[default]
    Inactive = 0,
    /// On.
    Active = 1,
    /// Blinking: identify the slot.
    Identify = 2,
    /// Blinking: a power transition / operator action is in progress.
    Action = 3,
}

impl DrIndicator {
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

/// Stream encoding (a `u8` discriminant) of an enum the migrated state carries, so the codec
/// refuses values the enum does not have.
macro_rules! wire_enum {
    (indicator $t:ty: $($v:expr),+ $(,)?) => {
        wire_enum!($t: $($v),+);
        impl $t {
            /// Parse a value the guest wrote (a 32-bit register): the same values as on the wire.
            pub fn from_guest(v: u32) -> Option<Self> {
                u8::try_from(v)
                    .ok()
                    .and_then(<Self as devstate::WireEnum>::from_wire)
            }
        }
    };
    ($t:ty: $($v:expr),+ $(,)?) => {
        impl devstate::WireEnum for $t {
            type Repr = u8;
            const VALUES: &'static [Self] = &[$($v),+];
            fn to_wire(self) -> u8 {
                self as u8
            }
        }
    };
}

// `Invalid` (0) is reserved: no stream carries it.
wire_enum!(DrcState:
    DrcState::LogicalUnusable,
    DrcState::LogicalAvailable,
    DrcState::LogicalUnisolate,
    DrcState::LogicalConfigured,
    DrcState::PhysicalAvailable,
    DrcState::PhysicalPowerOn,
    DrcState::PhysicalUnisolate,
    DrcState::PhysicalConfigured,
);
wire_enum!(indicator Isolation: Isolation::Isolated, Isolation::Unisolated);
wire_enum!(indicator Allocation: Allocation::Unusable, Allocation::Usable);
wire_enum!(indicator DrIndicator:
    DrIndicator::Inactive,
    DrIndicator::Active,
    DrIndicator::Identify,
    DrIndicator::Action,
);
