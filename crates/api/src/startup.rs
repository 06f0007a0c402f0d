use crate::{
    clock::Clock,
    config::ApiConfig,
    publisher::Publisher,
    routes::{self, AppState},
};
use actix_web::{dev::Server, web, App, HttpServer};
use notify_store::Store;
use notify_types::broker::Failover;
use notify_types::routes::Routes;
use std::{net::TcpListener, sync::Arc};
use tracing_actix_web::TracingLogger;

/// The API server, bound and ready to run. Tests build it on port 0.
pub struct Application {
    port: u16,
    server: Server,
    publisher: Publisher,
    store: Store,
}

impl Application {
    /// Binds the listener, connects to RabbitMQ and declares the topology. Fails on a bad
    /// address or a topology mismatch; an unreachable broker only makes the API unready.
    pub async fn build(config: ApiConfig) -> anyhow::Result<Application> {
        Self::build_with_clock(config, Clock::system()).await
    }

    /// [`Application::build`] with the clock the idempotency rules read (tests move it).
    pub async fn build_with_clock(config: ApiConfig, clock: Clock) -> anyhow::Result<Application> {
        crate::metrics::init();
        let listener = TcpListener::bind((config.host.as_str(), config.port)).map_err(|e| {
            anyhow::anyhow!("cannot listen on {}:{} (API_HOST/API_PORT): {e}", config.host, config.port)
        })?;
        let port = listener.local_addr()?.port();
        let routes = Arc::new(Routes::load(&config.routes_file)?);
        routes.warn_disabled();
        let mut topology = config.topology.clone();
        topology.event_routes = routes.bindings();
        let store = Store::connect_lazy(&config.database_url, &config.database_schema, 8)
            .map_err(|e| anyhow::anyhow!("DATABASE_URL / DATABASE_SCHEMA: {e}"))?;
        if let Err(e) = store.migrate().await {
            // Only idempotency keys, status and the inbox need Postgres; accepting does not.
            tracing::warn!(error = %e, "cannot migrate the database at start; its endpoints answer 503 until it is reachable");
        }
        let publisher = Publisher::start(
            Failover::with_order(&config.rabbitmq_url, config.rabbitmq_url_order),
            topology.clone(),
            config.publish_timeout,
            config.publish_channels,
        )
        .await?;
        let dead_letters = web::Data::new(crate::dead_letters::DeadLetterAdmin {
            store: store.clone(),
            rabbitmq_url: config.rabbitmq_url.clone(),
            url_order: config.rabbitmq_url_order,
            topology: topology.clone(),
            replay_limit: config.replay_limit,
            publish_timeout: config.publish_timeout,
        });
        let state = web::Data::new(AppState {
            publisher: publisher.clone(),
            body_limits: crate::extract::BodyLimits { bytes: config.max_body_bytes, timeout: config.request_timeout },
            routes,
            store: Some(store.clone()),
            allow_private_webhooks: config.allow_private_webhooks,
            clock,
            answers: Arc::default(),
        });
        if config.api_keys.is_empty() {
            tracing::warn!("API_KEYS is empty: the API accepts requests without authentication");
        }
        let keys = web::Data::new(config.api_keys.clone());
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(crate::auth::require_key))
                .wrap(TracingLogger::default())
                // Outermost: counts every answer, the key check's 401s included.
                .wrap(actix_web::middleware::from_fn(crate::metrics::record))
                .app_data(keys.clone())
                .app_data(state.clone())
                .app_data(dead_letters.clone())
                .configure(routes::configure)
                .default_service(web::to(routes::not_found))
        })
        // Headers get as long as a body (the handler bounds the body: 408 in the JSON shape).
        .client_request_timeout(config.request_timeout)
        .listen(listener)?
        // In-flight requests get this long to finish after SIGTERM.
        .shutdown_timeout(25);
        if config.http_workers > 0 {
            server = server.workers(config.http_workers);
        }
        if !config.handle_signals {
            server = server.disable_signals();
        }
        tracing::info!(port, "notify-api listening");
        Ok(Application { port, server: server.run(), publisher, store })
    }

    /// The API's database handle (tests inject failures into it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server gracefully (tests; the binary stops on signals).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped, then closes the broker connection.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let result = self.server.await;
        self.publisher.close().await;
        result
    }
}
