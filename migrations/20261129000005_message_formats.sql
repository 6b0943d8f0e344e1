-- The seed design's message formats: avro and protobuf records travel as base64 text.
ALTER TABLE message_topics DROP CONSTRAINT message_topics_message_format_check;
ALTER TABLE message_topics ADD CONSTRAINT message_topics_message_format_check
    CHECK (message_format IN ('json', 'avro', 'protobuf', 'text', 'binary'));
