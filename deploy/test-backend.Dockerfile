# The workspace's test backend as an image (answers with its hostname over HTTP, TCP and
# UDP), for the compose example. Built by `cargo xtask image`.
FROM scratch
COPY xlb-test-backend /xlb-test-backend
ENTRYPOINT ["/xlb-test-backend"]
CMD ["--http", "0.0.0.0:8080", "--linger", "2000"]
