-- wrk script: one short non-streaming completion per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"echo","prompt":"hello","max_tokens":4}'
