package chorus.bench;

import com.fasterxml.jackson.annotation.JsonProperty;
import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.Optional;
import java.util.Properties;
import java.util.Set;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.GroupIdNotFoundException;
import org.apache.kafka.common.errors.UnknownTopicOrPartitionException;
import org.apache.kafka.common.serialization.ByteArraySerializer;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.CloseOptions;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.TopologyConfig;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.processor.api.Processor;
import org.apache.kafka.streams.processor.api.ProcessorContext;
import org.apache.kafka.streams.processor.api.Record;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * Kafka Streams yardstick for chorus's benchmark (see README.md).
 *
 * <pre>
 *   java -jar kafka-streams-bench.jar produce     --brokers B --events N --customers C --input T [--output T2] --partitions P
 *   java -jar kafka-streams-bench.jar passthrough --brokers B --events N --input T --output T2 --partitions P --application-id ID
 *   java -jar kafka-streams-bench.jar profile     --brokers B --events N --input T --output T2 --partitions P --application-id ID
 *   java -jar kafka-streams-bench.jar cleanup     --brokers B --topics T,T2 [--application-id ID,ID2]
 * </pre>
 *
 * The timed modes print exactly one JSON line on stdout; everything else goes to stderr.
 */
public final class KafkaStreamsBench {
    private static final ObjectMapper JSON = new ObjectMapper();
    private static final String[] EVENT_TYPES = {
        "page.viewed", "product.viewed", "cart.item_added", "order.completed", "app.opened"
    };

    private KafkaStreamsBench() {}

    public static void main(String[] argv) {
        try {
            if (argv.length == 0 || argv[0].equals("-h") || argv[0].equals("--help")) {
                usage();
                System.exit(argv.length == 0 ? 2 : 0);
            }
            String mode = argv[0];
            Args args = Args.parse(argv, 1);
            switch (mode) {
                case "produce" -> produce(args);
                case "passthrough", "profile" -> timed(mode, args);
                case "cleanup" -> cleanup(args);
                default -> throw new Usage("unknown mode '" + mode + "'");
            }
            System.exit(0);
        } catch (Usage e) {
            System.err.println("kafka-streams-bench: error: " + e.getMessage());
            usage();
            System.exit(2);
        } catch (Exception e) {
            System.err.println("kafka-streams-bench: error: " + e);
            Throwable cause = e.getCause();
            while (cause != null) {
                System.err.println("  caused by: " + cause);
                cause = cause.getCause();
            }
            System.exit(1);
        }
    }

    private static void usage() {
        System.err.println(String.join("\n",
            "usage: kafka-streams-bench MODE [options]",
            "  produce      --brokers B --events N --customers C --input T [--output T2] --partitions P",
            "               creates the topics (they must not exist yet) and writes the workload to T",
            "  passthrough  --brokers B --events N --input T --output T2 --partitions P --application-id ID",
            "  profile      --brokers B --events N --input T --output T2 --partitions P --application-id ID",
            "               [--state-dir DIR] [--timeout-s S]: prints one JSON line on stdout",
            "  cleanup      --brokers B [--topics T,T2] [--application-id ID,ID2]",
            "               deletes the topics, the apps' internal topics and consumer groups"));
    }

    // ------------------------------------------------------------ arguments ---

    static final class Usage extends Exception {
        Usage(String message) {
            super(message);
        }
    }

    static final class Args {
        final Map<String, String> values = new HashMap<>();

        static Args parse(String[] argv, int from) throws Usage {
            Args a = new Args();
            for (int i = from; i < argv.length; i++) {
                String arg = argv[i];
                if (!arg.startsWith("--")) {
                    throw new Usage("unexpected argument '" + arg + "'");
                }
                int eq = arg.indexOf('=');
                if (eq > 0) {
                    a.values.put(arg.substring(2, eq), arg.substring(eq + 1));
                } else {
                    if (i + 1 >= argv.length) {
                        throw new Usage(arg + " needs a value");
                    }
                    a.values.put(arg.substring(2), argv[++i]);
                }
            }
            return a;
        }

        String str(String name) throws Usage {
            String v = values.get(name);
            if (v == null || v.isEmpty()) {
                throw new Usage("--" + name + " is required");
            }
            return v;
        }

        String str(String name, String fallback) {
            String v = values.get(name);
            return v == null || v.isEmpty() ? fallback : v;
        }

        long positive(String name, Long fallback) throws Usage {
            String v = values.get(name);
            if (v == null) {
                if (fallback == null) {
                    throw new Usage("--" + name + " is required");
                }
                return fallback;
            }
            try {
                long n = Long.parseLong(v);
                if (n <= 0) {
                    throw new NumberFormatException();
                }
                return n;
            } catch (NumberFormatException e) {
                throw new Usage("--" + name + " must be a positive integer, got '" + v + "'");
            }
        }

        List<String> list(String name) {
            List<String> out = new ArrayList<>();
            for (String s : str(name, "").split(",")) {
                if (!s.isBlank()) {
                    out.add(s.trim());
                }
            }
            return out;
        }
    }

    private static Properties adminProps(String brokers) {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, 30_000);
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 60_000);
        return p;
    }

    // -------------------------------------------------------------- produce ---

    /** One event of chorus's bench workload (src/bench.rs `fn event`), keys in serde_json's order. */
    static String event(long i, long customers, String timestamp) {
        long c = i % customers;
        StringBuilder sb = new StringBuilder(320);
        sb.append('{');
        if (i % 50 == 0) {
            sb.append("\"anonymous_id\":\"anon-").append(c).append("\",");
        }
        sb.append("\"channel\":\"").append(i % 3 == 0 ? "mobile_app" : "web").append("\",")
            .append("\"customer_id\":\"c").append(c).append("\",")
            .append("\"event_id\":\"bench-").append(i).append("\",")
            .append("\"event_type\":\"").append(EVENT_TYPES[(int) (i % 5)]).append("\",")
            .append("\"payload\":{\"category\":\"outdoor\",\"price\":19.5,\"product_id\":\"p").append(i % 997)
            .append("\",\"quantity\":1,\"total\":39.0},")
            .append("\"timestamp\":\"").append(timestamp).append("\"}");
        return sb.toString();
    }

    private static void produce(Args args) throws Exception {
        String brokers = args.str("brokers");
        long events = args.positive("events", null);
        long customers = args.positive("customers", 20_000L);
        int partitions = (int) args.positive("partitions", 8L);
        String input = args.str("input");
        String output = args.str("output", null);

        List<NewTopic> topics = new ArrayList<>();
        topics.add(new NewTopic(input, Optional.of(partitions), Optional.empty()));
        if (output != null) {
            topics.add(new NewTopic(output, Optional.of(partitions), Optional.empty()));
        }
        try (Admin admin = Admin.create(adminProps(brokers))) {
            admin.createTopics(topics).all().get(60, TimeUnit.SECONDS);
            waitForLeaders(admin, topics.stream().map(NewTopic::name).toList(), partitions);
        }

        Properties p = new Properties();
        p.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, true);
        p.put(ProducerConfig.LINGER_MS_CONFIG, 20);
        p.put(ProducerConfig.BATCH_SIZE_CONFIG, 256 * 1024);
        p.put(ProducerConfig.BUFFER_MEMORY_CONFIG, 128L * 1024 * 1024);
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, 120_000);
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class);
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class);

        long started = System.nanoTime();
        AtomicReference<Exception> failure = new AtomicReference<>();
        AtomicLong acked = new AtomicLong();
        try (KafkaProducer<String, byte[]> producer = new KafkaProducer<>(p)) {
            for (long i = 0; i < events && failure.get() == null; i++) {
                String at = Instant.ofEpochMilli(System.currentTimeMillis()).toString();
                byte[] value = event(i, customers, at).getBytes(StandardCharsets.UTF_8);
                producer.send(new ProducerRecord<>(input, "c" + (i % customers), value), (meta, e) -> {
                    if (e != null) {
                        failure.compareAndSet(null, e);
                    } else {
                        acked.incrementAndGet();
                    }
                });
            }
            producer.flush();
        }
        if (failure.get() != null) {
            throw new RuntimeException("producing to " + input + " failed", failure.get());
        }
        if (acked.get() != events) {
            throw new IllegalStateException("only " + acked.get() + " of " + events + " records were acknowledged");
        }
        double s = (System.nanoTime() - started) / 1e9;
        System.err.printf(Locale.ROOT, "kafka-streams-bench: produced %d events over %d customers to %s (%d partitions) in %.1f s%n",
            events, customers, input, partitions, s);
    }

    /** Fresh topics may take a moment to get a leader on every partition. */
    private static void waitForLeaders(Admin admin, List<String> names, int partitions) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
        while (true) {
            try {
                Map<String, TopicDescription> d = admin.describeTopics(names).allTopicNames().get(30, TimeUnit.SECONDS);
                boolean ready = d.values().stream().allMatch(t -> t.partitions().size() == partitions
                    && t.partitions().stream().allMatch(pi -> pi.leader() != null && !pi.leader().isEmpty()));
                if (ready) {
                    return;
                }
            } catch (ExecutionException e) {
                if (!(e.getCause() instanceof UnknownTopicOrPartitionException)) {
                    throw e;
                }
            }
            if (System.nanoTime() > deadline) {
                throw new IllegalStateException("topics " + names + " have no leader after 60 s");
            }
            Thread.sleep(100);
        }
    }

    // ---------------------------------------------------------------- timed ---

    /** First record in → N-th record processed, across all stream threads. */
    static final class Meter {
        private final long target;
        private final AtomicLong count = new AtomicLong();
        private final AtomicLong first = new AtomicLong(Long.MIN_VALUE);
        private volatile long last;
        final CountDownLatch done = new CountDownLatch(1);

        Meter(long target) {
            this.target = target;
        }

        void entered() {
            if (first.get() == Long.MIN_VALUE) {
                first.compareAndSet(Long.MIN_VALUE, System.nanoTime());
            }
        }

        void processed() {
            if (count.incrementAndGet() == target) {
                last = System.nanoTime();
                done.countDown();
            }
        }

        long count() {
            return count.get();
        }

        double seconds() {
            return (last - first.get()) / 1e9;
        }
    }

    /** The 5-field customer profile (the aggregate's state and the output value). */
    public static final class Profile {
        @JsonProperty("event_count") public long eventCount;
        @JsonProperty("last_event_type") public String lastEventType;
        @JsonProperty("last_seen") public String lastSeen;
        @JsonProperty("order_count") public long orderCount;
        @JsonProperty("lifetime_value") public double lifetimeValue;
    }

    static final class JsonSerde<T> implements Serde<T> {
        private final Class<T> type;

        JsonSerde(Class<T> type) {
            this.type = type;
        }

        @Override
        public Serializer<T> serializer() {
            return (topic, value) -> {
                if (value == null) {
                    return null;
                }
                try {
                    return JSON.writeValueAsBytes(value);
                } catch (Exception e) {
                    throw new IllegalStateException("cannot serialise " + type.getSimpleName(), e);
                }
            };
        }

        @Override
        public Deserializer<T> deserializer() {
            return (topic, bytes) -> {
                if (bytes == null) {
                    return null;
                }
                try {
                    return JSON.readValue(bytes, type);
                } catch (Exception e) {
                    throw new IllegalStateException("cannot parse " + type.getSimpleName(), e);
                }
            };
        }
    }

    static Profile fold(Profile p, byte[] value) {
        JsonNode e;
        try {
            e = JSON.readTree(value);
        } catch (Exception ex) {
            throw new IllegalStateException("event is not JSON", ex);
        }
        String type = e.path("event_type").asText("");
        p.eventCount++;
        p.lastEventType = type;
        JsonNode ts = e.get("timestamp");
        if (ts != null && ts.isTextual()) {
            p.lastSeen = ts.asText();
        }
        if (type.equals("order.completed")) {
            p.orderCount++;
            p.lifetimeValue += e.path("payload").path("total").asDouble(0.0);
        }
        return p;
    }

    static Topology passthroughTopology(Properties config, String input, String output, Meter meter) {
        StreamsBuilder builder = new StreamsBuilder(new TopologyConfig(new StreamsConfig(config)));
        builder.stream(input, Consumed.with(Serdes.ByteArray(), Serdes.ByteArray()))
            // A no-op node that times the copy: the record is handed to the sink (the
            // producer) by forward(), so it counts as processed once forward() returns.
            .process(() -> new Processor<byte[], byte[], byte[], byte[]>() {
                private ProcessorContext<byte[], byte[]> ctx;

                @Override
                public void init(ProcessorContext<byte[], byte[]> context) {
                    ctx = context;
                }

                @Override
                public void process(Record<byte[], byte[]> record) {
                    meter.entered();
                    ctx.forward(record);
                    meter.processed();
                }
            })
            .to(output, Produced.with(Serdes.ByteArray(), Serdes.ByteArray()));
        return builder.build();
    }

    static Topology profileTopology(Properties config, String input, String output, Meter meter) {
        Serde<Profile> profileSerde = new JsonSerde<>(Profile.class);
        StreamsBuilder builder = new StreamsBuilder(new TopologyConfig(new StreamsConfig(config)));
        builder.stream(input, Consumed.with(Serdes.String(), Serdes.ByteArray()))
            .peek((k, v) -> meter.entered())
            // Keyed by customer id already: no repartition topic, one RocksDB store + changelog.
            .groupByKey(Grouped.with(Serdes.String(), Serdes.ByteArray()))
            .aggregate(Profile::new, (customer, value, profile) -> {
                Profile updated = fold(profile, value);
                meter.processed();
                return updated;
            }, Materialized.<String, Profile, KeyValueStore<Bytes, byte[]>>as("profiles")
                .withKeySerde(Serdes.String())
                .withValueSerde(profileSerde))
            .toStream()
            .to(output, Produced.with(Serdes.String(), profileSerde));
        return builder.build();
    }

    private static void timed(String mode, Args args) throws Exception {
        String brokers = args.str("brokers");
        long events = args.positive("events", null);
        String input = args.str("input");
        String output = args.str("output");
        long partitions = args.positive("partitions", 8L);
        String appId = args.str("application-id");
        long timeoutS = args.positive("timeout-s", 1800L);
        String stateDirArg = args.str("state-dir", null);

        checkTopics(brokers, input, output, (int) partitions, events);
        File stateDir = stateDirArg != null ? new File(stateDirArg)
            : Files.createTempDirectory("kafka-streams-bench-").toFile();
        try {
            runTimed(mode, brokers, events, input, output, appId, timeoutS, stateDir);
        } finally {
            if (stateDirArg == null) {
                deleteRecursively(stateDir);
            }
        }
    }

    private static void runTimed(String mode, String brokers, long events, String input, String output,
            String appId, long timeoutS, File stateDir) throws Exception {

        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 2);
        p.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 100);
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir.getAbsolutePath());
        p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");
        // Opt in now to what Kafka 5.0 makes the default (and what it warns about when off).
        p.put("processing.exception.handler.global.enabled", true);

        Meter meter = new Meter(events);
        Topology topology = mode.equals("passthrough")
            ? passthroughTopology(p, input, output, meter)
            : profileTopology(p, input, output, meter);

        AtomicReference<Throwable> failure = new AtomicReference<>();
        CountDownLatch stopped = new CountDownLatch(1);
        KafkaStreams streams = new KafkaStreams(topology, p);
        streams.setUncaughtExceptionHandler(e -> {
            failure.compareAndSet(null, e);
            stopped.countDown();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.ERROR || now == KafkaStreams.State.PENDING_ERROR) {
                stopped.countDown();
            }
        });
        streams.cleanUp();
        streams.start();

        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(timeoutS);
        boolean finished = false;
        while (System.nanoTime() < deadline) {
            if (meter.done.await(100, TimeUnit.MILLISECONDS)) {
                finished = true;
                break;
            }
            if (stopped.getCount() == 0) {
                break;
            }
        }
        // Leave the group on close (Streams stays in it by default), so the run leaves no
        // live member behind and `cleanup` can delete the consumer group right away.
        boolean closed = streams.close(CloseOptions
            .groupMembershipOperation(CloseOptions.GroupMembershipOperation.LEAVE_GROUP)
            .withTimeout(Duration.ofSeconds(60)));
        if (closed) {
            streams.cleanUp();
        }
        if (!finished) {
            String why = failure.get() != null ? "the streams app failed: " + failure.get()
                : stopped.getCount() == 0 ? "the streams app went to state " + streams.state()
                : "timed out after " + timeoutS + " s";
            throw new IllegalStateException(mode + ": " + why + " (" + meter.count() + " of " + events
                + " records processed)", failure.get());
        }
        if (!closed) {
            System.err.println("kafka-streams-bench: warning: the streams app did not close within 60 s");
        }
        double seconds = meter.seconds();
        System.out.printf(Locale.ROOT,
            "{\"system\":\"kafka-streams\",\"mode\":\"%s\",\"events\":%d,\"seconds\":%.3f,\"events_per_s\":%.0f}%n",
            mode, events, seconds, events / seconds);
        System.out.flush();
    }

    /**
     * Fail fast instead of hanging: the input must exist with the expected partitions and hold
     * at least N records, and the output topic must exist (the broker may not auto-create it).
     */
    private static void checkTopics(String brokers, String input, String output, int partitions, long events)
            throws Exception {
        try (Admin admin = Admin.create(adminProps(brokers))) {
            Set<String> existing = admin.listTopics().names().get(60, TimeUnit.SECONDS);
            for (String t : List.of(input, output)) {
                if (!existing.contains(t)) {
                    throw new IllegalStateException("topic " + t + " does not exist (the produce mode creates both)");
                }
            }
            TopicDescription d = admin.describeTopics(List.of(input)).allTopicNames().get(60, TimeUnit.SECONDS).get(input);
            if (d.partitions().size() != partitions) {
                throw new IllegalStateException(input + " has " + d.partitions().size() + " partitions, not " + partitions);
            }
            Map<TopicPartition, OffsetSpec> latest = new HashMap<>();
            d.partitions().forEach(pi -> latest.put(new TopicPartition(input, pi.partition()), OffsetSpec.latest()));
            long total = admin.listOffsets(latest).all().get(60, TimeUnit.SECONDS).values().stream()
                .mapToLong(r -> r.offset()).sum();
            if (total < events) {
                throw new IllegalStateException(input + " holds " + total + " records, fewer than --events " + events);
            }
        }
    }

    private static void deleteRecursively(File f) {
        File[] children = f.listFiles();
        if (children != null) {
            for (File c : children) {
                deleteRecursively(c);
            }
        }
        f.delete();
    }

    // -------------------------------------------------------------- cleanup ---

    private static void cleanup(Args args) throws Exception {
        String brokers = args.str("brokers");
        List<String> topics = args.list("topics");
        List<String> apps = args.list("application-id");
        try (Admin admin = Admin.create(adminProps(brokers))) {
            Set<String> existing = admin.listTopics().names().get(60, TimeUnit.SECONDS);
            List<String> doomed = new ArrayList<>();
            for (String t : existing) {
                boolean internal = apps.stream().anyMatch(a -> t.startsWith(a + "-"));
                if (topics.contains(t) || internal) {
                    doomed.add(t);
                }
            }
            if (!doomed.isEmpty()) {
                admin.deleteTopics(doomed).all().get(60, TimeUnit.SECONDS);
            }
            if (!apps.isEmpty()) {
                try {
                    admin.deleteConsumerGroups(apps).all().get(60, TimeUnit.SECONDS);
                } catch (ExecutionException e) {
                    if (!(e.getCause() instanceof GroupIdNotFoundException)) {
                        System.err.println("kafka-streams-bench: warning: deleting groups " + apps + ": " + e.getCause());
                    }
                }
            }
            System.err.println("kafka-streams-bench: deleted " + doomed.size() + " topics");
        }
    }
}
