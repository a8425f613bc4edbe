//! The RabbitMQ side: one connection and one publishing channel per worker.
//!
//! [`Broker::connect`] tries each configured host in order (TLS through OpenSSL when
//! `ssl_options` is set), names the connection `mikkoo <queue> <host>` so operators can
//! find it, turns on publisher confirms, and watches for `connection.blocked`. lapin's
//! own auto-recovery stays off: the worker decides what to publish again after a
//! failure, so reconnecting is its business too.
//!
//! Publishing returns lapin's confirm future; [`Broker::answer`] names what the broker
//! answered (acked, nacked, returned, channel closed, connection lost) and leaves the
//! decision to the worker.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::tcp::AsyncTcpStream;
use lapin::types::{LongString, ShortString};
use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, PublisherConfirm};
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::config::{RabbitmqConfig, TlsOptions};
use crate::mapping::Message;
use crate::stats::WorkerStats;

/// Why the broker could not be reached or used.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// No host accepted a connection.
    #[error("cannot connect to RabbitMQ at {target}: {reason}")]
    Connect {
        /// `host:port` tried last.
        target: String,
        /// What failed.
        reason: String,
    },
    /// The TLS settings could not be applied.
    #[error("RabbitMQ TLS: {0}")]
    Tls(String),
    /// The connection or channel failed while in use.
    #[error("RabbitMQ {what} failed: {source}")]
    Protocol {
        /// What was being done.
        what: &'static str,
        /// What lapin said.
        #[source]
        source: lapin::Error,
    },
}

/// What the broker answered for one published message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Confirmed (or written, when confirms are off).
    Acked,
    /// The broker refused it.
    Nacked,
    /// Unroutable and returned (mandatory), e.g. `NO_ROUTE`.
    Returned {
        /// AMQP reply code (312 for NO_ROUTE).
        reply_code: u16,
        /// The broker's text.
        reply_text: String,
    },
    /// The broker closed the channel (e.g. the exchange does not exist). The message
    /// that caused it is not known from this alone.
    ChannelClosed {
        /// The broker's reply text and code, when it sent one.
        reason: String,
    },
    /// The connection is gone; nothing unconfirmed can be trusted.
    ConnectionLost {
        /// What happened.
        reason: String,
    },
}

impl Outcome {
    /// Names a confirm result.
    pub fn from_result(result: lapin::Result<Confirmation>) -> Outcome {
        match result {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Outcome::Acked,
            Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => Outcome::Returned {
                reply_code: returned.reply_code,
                reply_text: returned.reply_text.to_string(),
            },
            Ok(Confirmation::Nack(None)) => Outcome::Nacked,
            Err(error) => Self::from_error(&error),
        }
    }

    /// Names a failed publish or confirm.
    pub fn from_error(error: &lapin::Error) -> Outcome {
        match error.kind() {
            ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)) => {
                Outcome::ChannelClosed {
                    reason: format!("{} (reply code {})", amqp.get_message(), amqp.get_id()),
                }
            }
            ErrorKind::InvalidChannelState(..) | ErrorKind::InvalidChannel(_) => Outcome::ChannelClosed {
                reason: error.to_string(),
            },
            _ => Outcome::ConnectionLost {
                reason: error.to_string(),
            },
        }
    }
}

/// One worker's connection and publishing channel.
pub struct Broker {
    connection: Connection,
    channel: Channel,
    confirm: bool,
    /// `host:port` this connection went to, for logs.
    address: String,
    /// `Some(reason)` while the broker has blocked the connection (resource alarm).
    blocked: watch::Receiver<Option<String>>,
    /// `Some(reason)` once the connection has failed.
    failed: watch::Receiver<Option<String>>,
    /// Forwards lapin's connection events into the two watches above.
    events: tokio::task::JoinHandle<()>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.events.abort();
    }
}

impl Broker {
    /// Connects to the first host that answers, opens the publishing channel and (when
    /// `confirm`) turns on publisher confirms.
    /// `observer`, when given, hears of blocking and connection failures as they happen
    /// (for `/readyz`), not only when the worker next looks.
    pub async fn connect(
        config: &RabbitmqConfig,
        queue: &str,
        confirm: bool,
        observer: Option<Arc<WorkerStats>>,
    ) -> Result<Broker, AmqpError> {
        let mut last_error = None;
        for host in &config.hosts {
            match tokio::time::timeout(
                config.connect_timeout,
                Self::connect_host(config, host, queue, confirm, observer.clone()),
            )
            .await
            {
                Ok(Ok(broker)) => return Ok(broker),
                Ok(Err(error)) => last_error = Some(error),
                Err(_) => {
                    last_error = Some(AmqpError::Connect {
                        target: format!("{host}:{}", config.port),
                        reason: format!("no answer within {:?}", config.connect_timeout),
                    });
                }
            }
        }
        Err(last_error.unwrap_or_else(|| AmqpError::Connect {
            target: "(no host configured)".to_owned(),
            reason: "rabbitmq.host is empty".to_owned(),
        }))
    }

    async fn connect_host(
        config: &RabbitmqConfig,
        host: &str,
        queue: &str,
        confirm: bool,
        observer: Option<Arc<WorkerStats>>,
    ) -> Result<Broker, AmqpError> {
        let address = format!("{host}:{}", config.port);
        let connect_error = |reason: String| AmqpError::Connect {
            target: address.clone(),
            reason,
        };
        let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, config.port))
            .await
            .map_err(|error| connect_error(format!("cannot resolve {host}: {error}")))?
            .collect();
        let tls = match &config.tls {
            Some(options) => Some((
                tls_connector(options)?,
                options.server_name.clone().unwrap_or_else(|| host.to_owned()),
            )),
            None => None,
        };
        let uri = amqp_uri(config, host);
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("mikkoo {queue} {host}")));
        let runtime = lapin::runtime::default_runtime().map_err(|error| connect_error(error.to_string()))?;
        let connection = Connection::connector(
            uri,
            runtime,
            async move |_uri, runtime| {
                let stream = AsyncTcpStream::connect(&runtime, addresses.clone()).await?;
                match &tls {
                    Some((connector, server_name)) => Ok(stream.into_openssl(connector, server_name).await?),
                    None => Ok(stream),
                }
            },
            properties,
        )
        .await
        .map_err(|error| connect_error(describe_connect_error(&error, config.tls.as_ref())))?;

        let channel = publishing_channel(&connection, confirm).await?;
        let (blocked_tx, blocked) = watch::channel(None);
        let (failed_tx, failed) = watch::channel(None);
        let events = tokio::spawn(forward_events(
            connection.events_listener(),
            blocked_tx,
            failed_tx,
            observer,
        ));
        Ok(Broker {
            connection,
            channel,
            confirm,
            address,
            blocked,
            failed,
            events,
        })
    }

    /// `host:port` of the broker this connection went to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Publishes one message. The returned future resolves to the broker's answer
    /// (immediately when confirms are off). An `Err` means the channel or connection
    /// could not take the message at all.
    pub async fn publish(
        &self,
        message: Message,
        body: &[u8],
        mandatory: bool,
    ) -> Result<PublisherConfirm, lapin::Error> {
        self.channel
            .basic_publish(
                message.exchange,
                message.routing_key,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                message.properties,
            )
            .await
    }

    /// Publishes one message, once the broker does not block the connection, and waits
    /// for its answer (see [`Broker::answer`]).
    pub async fn publish_and_wait(
        &self,
        message: Message,
        body: &[u8],
        mandatory: bool,
        deadline: Duration,
    ) -> Outcome {
        self.wait_unblocked().await;
        match self.publish(message, body, mandatory).await {
            Ok(confirm) => self.answer(confirm, deadline).await,
            Err(error) => Outcome::from_error(&error),
        }
    }

    /// The broker's answer to a published message. A broker that stays silent for
    /// `deadline` counts as a lost connection — except while it blocks the connection:
    /// then it is not reading at all, and the deadline starts again once it unblocks.
    pub async fn answer(
        &self,
        mut confirm: impl Future<Output = lapin::Result<Confirmation>> + Unpin,
        deadline: Duration,
    ) -> Outcome {
        let mut blocked = self.blocked.clone();
        loop {
            if blocked.borrow().is_some() {
                tokio::select! {
                    result = &mut confirm => return Outcome::from_result(result),
                    _ = blocked.wait_for(Option::is_none) => continue,
                }
            }
            tokio::select! {
                result = &mut confirm => return Outcome::from_result(result),
                _ = tokio::time::sleep(deadline) => {
                    return Outcome::ConnectionLost {
                        reason: format!("no publisher confirm within {deadline:?}"),
                    };
                }
                _ = blocked.wait_for(Option::is_some) => continue,
            }
        }
    }

    /// Replaces a channel the broker closed with a fresh one on the same connection.
    pub async fn reopen_channel(&mut self) -> Result<(), AmqpError> {
        self.channel = publishing_channel(&self.connection, self.confirm).await?;
        Ok(())
    }

    /// Consumes `queue` on a channel of its own, at most `prefetch` unacknowledged
    /// messages at a time (for `mikkoo audit consume`).
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<lapin::Consumer, AmqpError> {
        let protocol = |what| move |source| AmqpError::Protocol { what, source };
        let channel = self
            .connection
            .create_channel()
            .await
            .map_err(protocol("channel.open"))?;
        channel
            .basic_qos(prefetch, lapin::options::BasicQosOptions::default())
            .await
            .map_err(protocol("basic.qos"))?;
        let queue_name = ShortString::try_new(queue).map_err(|_| AmqpError::Connect {
            target: self.address.clone(),
            reason: format!("queue name {queue:?} is longer than 255 bytes"),
        })?;
        channel
            .basic_consume(
                queue_name,
                ShortString::from("mikkoo-audit"),
                lapin::options::BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .map_err(protocol("basic.consume"))
    }

    /// Why the broker blocked the connection, while it does.
    pub fn blocked_reason(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }

    /// Waits until the broker unblocks the connection (returns at once when it is not
    /// blocked) or the connection fails.
    pub async fn wait_unblocked(&self) {
        let (mut blocked, mut failed) = (self.blocked.clone(), self.failed.clone());
        tokio::select! {
            _ = blocked.wait_for(Option::is_none) => {}
            _ = failed.wait_for(Option::is_some) => {}
        }
    }

    /// Why the connection failed, once it has.
    pub fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// True while the connection is usable.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected() && self.failed.borrow().is_none()
    }

    /// Closes the connection politely, giving the broker a few seconds to answer; the
    /// socket is dropped either way, so a dead connection never lingers.
    pub async fn close(self) {
        const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
        if self.connection.status().connected() {
            let close = self.connection.close(200, "mikkoo closing".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
        }
    }
}

/// Opens a channel for publishing, in confirm mode when `confirm`.
async fn publishing_channel(connection: &Connection, confirm: bool) -> Result<Channel, AmqpError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|source| AmqpError::Protocol {
            what: "channel.open",
            source,
        })?;
    if confirm {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|source| AmqpError::Protocol {
                what: "confirm.select",
                source,
            })?;
    }
    Ok(channel)
}

async fn forward_events(
    events: impl futures_util::Stream<Item = lapin::Event>,
    blocked: watch::Sender<Option<String>>,
    failed: watch::Sender<Option<String>>,
    observer: Option<Arc<WorkerStats>>,
) {
    use futures_util::StreamExt;
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                tracing::warn!(%reason, "rabbitmq blocked the connection; publishing paused");
                if let Some(stats) = &observer {
                    stats.set_blocked(Some(reason.clone()));
                }
                blocked.send_replace(Some(reason));
            }
            lapin::Event::ConnectionUnblocked => {
                tracing::info!("rabbitmq unblocked the connection; publishing resumes");
                if let Some(stats) = &observer {
                    stats.set_blocked(None);
                }
                blocked.send_replace(None);
            }
            // Channel-level (soft) errors are settled per event by the worker; only a
            // connection-level failure makes the connection unusable.
            lapin::Event::Error(error) if !error.is_amqp_soft_error() => {
                if let Some(stats) = &observer {
                    stats.set_broker_connected(false);
                    stats.set_last_error(Some(format!("lost the RabbitMQ connection: {error}")));
                }
                failed.send_replace(Some(error.to_string()));
            }
            _ => {}
        }
    }
}

fn amqp_uri(config: &RabbitmqConfig, host: &str) -> AMQPUri {
    AMQPUri {
        scheme: if config.tls.is_some() {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: config.username.clone(),
                password: config.password.expose().to_owned(),
            },
            host: host.to_owned(),
            port: config.port,
        },
        vhost: config.vhost.clone(),
        query: AMQPQueryString {
            frame_max: Some(config.frame_max),
            heartbeat: Some(u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX)),
            connection_timeout: Some(u64::try_from(config.connect_timeout.as_millis()).unwrap_or(u64::MAX)),
            ..AMQPQueryString::default()
        },
    }
}

/// Turns lapin's connect errors into words an operator can act on.
fn describe_connect_error(error: &lapin::Error, tls: Option<&TlsOptions>) -> String {
    let text = error.to_string();
    let presents_no_certificate = tls.is_some_and(|options| options.certfile.is_none());
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => format!(
            "{} (reply code {}); check the user name, password and vhost",
            amqp.get_message(),
            amqp.get_id()
        ),
        _ if text.contains("certificate verify failed") => format!(
            "{text} (TLS: the broker's certificate is not trusted or does not name this host; check \
             ssl_options.ca_certs / ca_path / ca_data and server_name, or set verify: false)"
        ),
        // TLS 1.3's alert for a missing client certificate (the broker asked for one).
        _ if text.contains("alert certificate required") => format!(
            "{text} (TLS: the broker requires a client certificate; set ssl_options.certfile and keyfile)"
        ),
        _ if text.contains("SSL routines") => format!("{text} (TLS handshake failed; check ssl_options)"),
        // The same refusal, when the broker's close wins the race with its alert: the
        // relay's first write after the handshake finds the connection gone.
        ErrorKind::IOError(io)
            if presents_no_certificate
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
        {
            format!(
                "{text} (TLS: the broker closed the connection right after the handshake, as one that requires \
                 a client certificate does; if it does, set ssl_options.certfile and keyfile)"
            )
        }
        _ => text,
    }
}

/// Builds the OpenSSL connector for `ssl_options` (OpenSSL semantics throughout).
pub fn tls_connector(options: &TlsOptions) -> Result<SslConnector, AmqpError> {
    let fail = |what: String, error: openssl::error::ErrorStack| AmqpError::Tls(format!("{what}: {error}"));
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(|e| fail("setup".into(), e))?;
    let has_ca = options.ca_certs.is_some() || options.ca_path.is_some() || options.ca_data.is_some();
    if !has_ca {
        builder
            .set_default_verify_paths()
            .map_err(|e| fail("cannot load the system trust store".into(), e))?;
    }
    if let Some(file) = &options.ca_certs {
        builder
            .set_ca_file(file)
            .map_err(|e| fail(format!("cannot load ca_certs {}", file.display()), e))?;
    }
    if let Some(dir) = &options.ca_path {
        let lookup = builder
            .cert_store_mut()
            .add_lookup(openssl::x509::store::X509Lookup::hash_dir())
            .map_err(|e| fail("setup".into(), e))?;
        let dir_text = dir
            .to_str()
            .ok_or_else(|| AmqpError::Tls(format!("ca_path {} is not valid UTF-8", dir.display())))?;
        lookup
            .add_dir(dir_text, SslFiletype::PEM)
            .map_err(|e| fail(format!("cannot use ca_path {}", dir.display()), e))?;
    }
    if let Some(pem) = &options.ca_data {
        let certificates = openssl::x509::X509::stack_from_pem(pem.as_bytes())
            .map_err(|e| fail("cannot parse ca_data".into(), e))?;
        for certificate in certificates {
            builder
                .cert_store_mut()
                .add_cert(certificate)
                .map_err(|e| fail("cannot add ca_data".into(), e))?;
        }
    }
    if let Some(certfile) = &options.certfile {
        builder
            .set_certificate_chain_file(certfile)
            .map_err(|e| fail(format!("cannot load certfile {}", certfile.display()), e))?;
        let keyfile = options.keyfile.as_ref().unwrap_or(certfile);
        let key_pem = std::fs::read(keyfile)
            .map_err(|error| AmqpError::Tls(format!("cannot read keyfile {}: {error}", keyfile.display())))?;
        let key = match &options.password {
            Some(password) => {
                openssl::pkey::PKey::private_key_from_pem_passphrase(&key_pem, password.expose().as_bytes())
            }
            None => openssl::pkey::PKey::private_key_from_pem(&key_pem),
        }
        .map_err(|e| {
            fail(
                format!("cannot load keyfile {} (wrong password?)", keyfile.display()),
                e,
            )
        })?;
        builder.set_private_key(&key).map_err(|e| {
            fail(
                format!("keyfile {} does not match certfile", keyfile.display()),
                e,
            )
        })?;
        builder.check_private_key().map_err(|e| {
            fail(
                format!("keyfile {} does not match certfile", keyfile.display()),
                e,
            )
        })?;
    }
    if let Some(ciphers) = &options.ciphers {
        builder
            .set_cipher_list(ciphers)
            .map_err(|e| fail(format!("invalid ciphers {ciphers:?}"), e))?;
    }
    builder.set_verify(if options.verify {
        SslVerifyMode::PEER
    } else {
        SslVerifyMode::NONE
    });
    Ok(builder.build())
}
