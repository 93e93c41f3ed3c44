#!/usr/bin/env bash
# Makes the EXAMPLE certificates of config/mtls-sidecar.yaml: a CA and the workload
# certificate of spiffe://mesh.local/ns/shop/sa/orders (ECDSA P-256, valid 100 years so the
# example keeps validating). Their keys are public: never use them outside examples.
set -euo pipefail
cd "$(dirname "$0")"
days=36500
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca-key.pem
openssl req -x509 -new -key ca-key.pem -days "$days" -subj "/CN=remora example mesh CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out orders-key.pem
openssl req -new -key orders-key.pem -subj "/CN=orders" -out orders.csr
openssl x509 -req -in orders.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
  -extfile <(printf '%s\n' \
    "subjectAltName=URI:spiffe://mesh.local/ns/shop/sa/orders,DNS:orders.shop.svc" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth") \
  -out orders.pem
rm -f orders.csr ca.srl
