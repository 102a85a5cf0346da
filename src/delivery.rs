//! The step between validation and the caller's "0": make the event durable,
//! either in the local spool (`spooled`) or on the broker (`confirmed`).

use crate::envelope::Envelope;
use crate::publish::{DirectPublisher, PublishError};
use crate::spool::{Spool, SpoolError};

/// Why an event could not be made durable now; the caller gets 503 and retries.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("spool full, retry later")]
    Full,
    #[error("spool cannot store events now, retry later")]
    Storage(#[source] SpoolError),
    #[error("broker cannot take events now ({0}), retry later")]
    Publish(#[source] PublishError),
}

/// Where accepted events go before the caller is answered.
pub enum Delivery {
    /// fsync'd to the spool; a forwarder publishes it later.
    Spooled(Spool),
    /// Published and confirmed by the broker before answering.
    Confirmed(Box<DirectPublisher>),
}

impl Delivery {
    /// Makes `envelope` durable, or says why not.
    pub async fn accept(&self, envelope: Envelope) -> Result<(), DeliveryError> {
        match self {
            Delivery::Spooled(spool) => match spool.append(envelope.encode()).await {
                Ok(_) => Ok(()),
                Err(SpoolError::Full { .. }) => Err(DeliveryError::Full),
                Err(e) => Err(DeliveryError::Storage(e)),
            },
            Delivery::Confirmed(publisher) => publisher
                .publish(&envelope)
                .await
                .map_err(DeliveryError::Publish),
        }
    }
}
