package outboxbench;

import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Json;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.serialization.StringSerializer;

/**
 * Reads the outbox_event table's changes from a pgoutput replication slot, routes them with
 * Debezium's EventRouter, and produces them to Kafka (acks=all, idempotent). A batch is marked
 * processed (so that its LSN may be confirmed) only after Kafka acknowledged all of it.
 *
 * Prints "READY" when streaming, then "DONE count first_ack_ms last_ack_ms" once EXPECTED
 * events were acknowledged (EXPECTED 0: run until stopped).
 */
public final class OutboxBench {
  public static void main(String[] args) throws Exception {
    String env = System.getenv("BENCH_EXPECTED");
    long expected = env == null ? 0 : Long.parseLong(env);
    String topic = System.getenv("BENCH_TOPIC");

    Properties p = new Properties();
    p.setProperty("name", "outbox-bench");
    p.setProperty("connector.class", "io.debezium.connector.postgresql.PostgresConnector");
    p.setProperty("offset.storage", "org.apache.kafka.connect.storage.MemoryOffsetBackingStore");
    p.setProperty("offset.flush.interval.ms", "1000");
    p.setProperty("database.hostname", System.getenv("PGHOST"));
    p.setProperty("database.port", System.getenv("PGPORT"));
    p.setProperty("database.user", System.getenv("PGUSER"));
    p.setProperty("database.password", System.getenv("PGPASSWORD"));
    p.setProperty("database.dbname", System.getenv("PGDATABASE"));
    p.setProperty("topic.prefix", "bench");
    p.setProperty("plugin.name", "pgoutput");
    p.setProperty("slot.name", "bench_slot");
    p.setProperty("publication.name", "bench_pub");
    p.setProperty("publication.autocreate.mode", "disabled");
    p.setProperty("snapshot.mode", "no_data");
    p.setProperty("table.include.list", "public.outbox_event");
    p.setProperty("max.batch.size", "2048");
    p.setProperty("max.queue.size", "16384");
    // Debezium waits poll.interval.ms (500 by default) when its queue is empty; 5 ms here, so
    // that latency compares with our relay's 2 ms idle poll.
    p.setProperty("poll.interval.ms", "5");
    p.setProperty("transforms", "outbox");
    p.setProperty("transforms.outbox.type", "io.debezium.transforms.outbox.EventRouter");
    p.setProperty("transforms.outbox.route.topic.replacement", topic);
    p.setProperty("transforms.outbox.table.expand.json.payload", "true");
    p.setProperty("key.converter.schemas.enable", "false");
    p.setProperty("value.converter.schemas.enable", "false");

    Properties kp = new Properties();
    kp.setProperty("bootstrap.servers", System.getenv("BENCH_BOOTSTRAP"));
    kp.setProperty("acks", "all");
    kp.setProperty("enable.idempotence", "true");
    kp.setProperty("linger.ms", "5");
    kp.setProperty("compression.type", "lz4");
    kp.setProperty("batch.size", "1000000");
    KafkaProducer<String, String> producer =
        new KafkaProducer<>(kp, new StringSerializer(), new StringSerializer());

    CountDownLatch done = new CountDownLatch(1);
    AtomicReference<Throwable> failure = new AtomicReference<>();
    long[] acked = {0};
    long[] first = {0};
    boolean[] ready = {false};

    DebeziumEngine<ChangeEvent<String, String>> engine =
        DebeziumEngine.create(Json.class)
            .using(p)
            .notifying((List<ChangeEvent<String, String>> records,
                        DebeziumEngine.RecordCommitter<ChangeEvent<String, String>> committer) -> {
              for (ChangeEvent<String, String> r : records) {
                if (r.value() == null) {
                  continue;
                }
                producer.send(new ProducerRecord<>(r.destination(), r.key(), r.value()),
                    (md, e) -> { if (e != null) { failure.compareAndSet(null, e); } });
              }
              producer.flush();
              if (failure.get() != null) {
                throw new RuntimeException("Kafka refused a message", failure.get());
              }
              for (ChangeEvent<String, String> r : records) {
                committer.markProcessed(r);
              }
              committer.markBatchFinished();
              long now = System.currentTimeMillis();
              if (first[0] == 0 && !records.isEmpty()) {
                first[0] = now;
              }
              acked[0] += records.size();
              if (expected > 0 && acked[0] >= expected) {
                System.out.println("DONE " + acked[0] + " " + first[0] + " " + now);
                System.out.flush();
                done.countDown();
              }
            })
            .using(new DebeziumEngine.ConnectorCallback() {
              @Override
              public void taskStarted() {
                if (!ready[0]) {
                  ready[0] = true;
                  System.out.println("READY");
                  System.out.flush();
                }
              }
            })
            .using((success, message, error) -> {
              if (!success) {
                System.err.println("engine stopped: " + message);
                done.countDown();
              }
            })
            .build();

    ExecutorService executor = Executors.newSingleThreadExecutor();
    executor.execute(engine);
    Runtime.getRuntime().addShutdownHook(new Thread(done::countDown));
    done.await();
    engine.close();
    producer.close();
    executor.shutdown();
    System.exit(0);
  }
}
