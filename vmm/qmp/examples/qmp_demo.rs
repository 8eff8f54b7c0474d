//! Serves the demo backend on the QMP socket given as the only argument.
//! Prints `READY` on stdout once the socket accepts connections; `quit`
//! stops it.

#[path = "../tests/common/backend.rs"]
mod backend;

use std::io::Write;
use std::sync::Arc;

use ferry_qmp::{EventBus, QmpConfig, QmpServer, VersionInfo};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args_os()
        .nth(1)
        .ok_or("usage: qmp_demo SOCKET_PATH")?;
    let events = EventBus::default();
    let vm = Arc::new(backend::DemoVm::new(events.clone()));
    let config = QmpConfig::new(VersionInfo::new(0, 1, 0, "ferry 0.1.0")).with_event_bus(events);
    let server = QmpServer::bind(&path, vm.clone(), config)?;
    vm.set_shutdown(server.shutdown_handle());
    println!("READY");
    std::io::stdout().flush()?;
    server.run().await?;
    Ok(())
}
